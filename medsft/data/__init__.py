"""SFT data, from a file to what the loop iterates: records (load + validate), render (chat template + loss mask),
dataset (tokenize once, cache), order (which examples each process sees per step, and their collator), collate
(padding) and packing (padding-free rows). templates holds the response layout and the Llama-3 template."""
