"""SFT data, from a source to what the loop iterates: sources (files, folders, Hub ids, read as streams), formats
(one adapter per record format), records (validate every record), render (chat template + loss spans), dataset
(split, tokenize once in parallel (tokenize), cache as a memory-mapped store (store), mix sources (mixture)),
order (which examples each process sees per step, and their collator), collate (padding) and packing
(padding-free rows). base holds the record types; templates the response layout and the Llama-3 template."""
