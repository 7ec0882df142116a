"""Training machinery every trainer shares: the loop (:mod:`.loop`), losses (:mod:`.losses`) and the
random-stream tags (:mod:`.streams`)."""
