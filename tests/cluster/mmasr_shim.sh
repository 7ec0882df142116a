#!/bin/sh
# Test double for the `mmasr` command, put first on PATH by tests/test_slurm.py (as `mmasr`):
# - appends one line per call to $MMASR_CALL_LOG: sub-command, --shard value, the SLURM job it ran in
#   and the GPU SLURM granted it (tab-separated, "-" where none), so the test sees where each job ran;
# - makes `mmasr nbest --shard $MMASR_FAULT_SHARD` fail, to exercise the n-best rule's `retries:`:
#   MMASR_FAULT=always fails every call; MMASR_FAULT=first-job fails every call made inside the first
#   SLURM job that ran the shard (however often Snakemake retries it there), so that job fails;
# - otherwise runs the real command, $MMASR_REAL, with the same arguments.
shard=- prev=
for arg in "$@"; do
    [ "$prev" = --shard ] && shard=$arg
    prev=$arg
done
job=${SLURM_JOB_ID:--}
printf '%s\t%s\t%s\t%s\n' "$1" "$shard" "$job" "${CUDA_VISIBLE_DEVICES:--}" >> "$MMASR_CALL_LOG"
if [ "$1" = nbest ] && [ "$shard" = "${MMASR_FAULT_SHARD:--}" ]; then
    first_job=$(awk -F '\t' -v s="$shard" '$1 == "nbest" && $2 == s { print $3; exit }' "$MMASR_CALL_LOG")
    case "${MMASR_FAULT:-}:$first_job" in
        always:* | "first-job:$job")
            echo "mmasr (test double): injected failure of n-best shard $shard (SLURM job $job)" >&2
            exit 1 ;;
    esac
fi
exec "$MMASR_REAL" "$@"
