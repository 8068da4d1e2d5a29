"""Chat templates and the response layout shared by training, evaluation and RL.

The response layout is HuatuoGPT-o1's, so its models and scorers stay compatible.
"""

THINKING_HEADER = "## Thinking"
FINAL_RESPONSE_HEADER = "## Final Response"

# The layout itself, for code that needs it whatever the config says (the end-of-turn probe, benchmarks). The
# config's default (conf/data/base.yaml, data.response_template) is this string; a test keeps the two equal.
DEFAULT_RESPONSE_TEMPLATE = f"{THINKING_HEADER}\n\n{{reasoning}}\n\n{FINAL_RESPONSE_HEADER}\n\n{{response}}"

# Llama-3 instruct template, assigned to tokenizers that ship none. The {% generation %} markers let
# apply_chat_template(..., return_assistant_tokens_mask=True) report the assistant span.
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{%- else %}"
    "{{- message['content'] | trim + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{%- endif %}"
)

LLAMA3_SPECIAL_TOKENS = {
    "bos_token": "<|begin_of_text|>",
    "eos_token": "<|eot_id|>",
    "pad_token": "<|finetune_right_pad_id|>",
    "additional": ["<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"],
}
