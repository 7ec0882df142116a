#!/bin/sh
# Test double for the `mmasr` command, put first on PATH by tests/test_slurm.py (as `mmasr`):
# - appends one line per call to $MMASR_CALL_LOG: sub-command, --shard value, the SLURM job it ran in
#   and the GPU SLURM granted it (tab-separated, "-" where none), so the test sees where each job ran;
# - makes the first $MMASR_FAULT_TIMES calls of `mmasr nbest --shard $MMASR_FAULT_SHARD` fail, to
#   exercise the n-best rule's `retries:`;
# - otherwise runs the real command, $MMASR_REAL, with the same arguments.
shard=- prev=
for arg in "$@"; do
    [ "$prev" = --shard ] && shard=$arg
    prev=$arg
done
printf '%s\t%s\t%s\t%s\n' "$1" "$shard" "${SLURM_JOB_ID:--}" "${CUDA_VISIBLE_DEVICES:--}" >> "$MMASR_CALL_LOG"
if [ "$1" = nbest ] && [ "$shard" = "${MMASR_FAULT_SHARD:--}" ]; then
    calls=$(grep -c "^nbest	$shard	" "$MMASR_CALL_LOG")
    if [ "$calls" -le "${MMASR_FAULT_TIMES:-0}" ]; then
        echo "mmasr (test double): injected failure of n-best shard $shard, call $calls" >&2
        exit 1
    fi
fi
exec "$MMASR_REAL" "$@"
