"""The prompt forms vLLM users pass: text, a list of token ids, {"prompt": text} or {"prompt_token_ids": ids}
(both keys together: the ids, with the text kept for display); and conversations rendered by a chat template."""

from __future__ import annotations


def is_token_ids(value) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value)


class PromptTooLongError(ValueError):
    """The prompt leaves no room in the context (max_model_len) for a generated token."""


def parse_prompt(prompt, tokenizer, vocab_size: int) -> tuple[str | None, list[int]]:
    """(text or None, token ids) of one prompt; raises naming what is wrong."""
    text = None
    if isinstance(prompt, dict):
        keys = set(prompt)
        if not keys or not keys <= {"prompt", "prompt_token_ids"}:
            raise ValueError(f"a prompt dict has the key 'prompt' or 'prompt_token_ids', got {sorted(keys)}")
        text = prompt.get("prompt")
        if text is not None and not isinstance(text, str):
            raise TypeError(f"'prompt' must be a str, got {type(text).__name__}")
        if "prompt_token_ids" not in prompt:
            prompt = text
        else:
            prompt = prompt["prompt_token_ids"]
            if not isinstance(prompt, (list, tuple)) or not prompt:
                raise TypeError("prompt_token_ids must be a non-empty list of ints")
    if isinstance(prompt, (list, tuple)):
        if not is_token_ids(prompt):
            raise TypeError("a token-id prompt must be a non-empty list of ints")
        if any(not 0 <= t < vocab_size for t in prompt):
            raise ValueError(f"prompt token ids must lie in 0..{vocab_size - 1} (the vocabulary)")
        return text, list(prompt)
    if not isinstance(prompt, str):
        raise TypeError("prompt must be a str, a list of token ids or a {'prompt_token_ids': [...]} dict, got "
                        f"{type(prompt).__name__}")
    token_ids = tokenizer.encode(prompt)
    if not token_ids:
        raise ValueError("prompt is empty after tokenization")
    return prompt, token_ids


class ChatPrompt(dict):
    """A conversation rendered with one tokenizer's chat template, as a {"prompt", "prompt_token_ids"} prompt
    (the template supplies any BOS text, so no special tokens are added again). It keeps the conversation, so a
    model with another tokenizer (the control plane's candidates) can render it with its own template."""

    def __init__(self, tokenizer, conversation: list[dict], chat_template: str | None = None,
                 add_generation_prompt: bool = True, **template_kwargs):
        self.conversation = list(conversation)
        self.chat_template = chat_template
        self.add_generation_prompt = add_generation_prompt
        self.template_kwargs = template_kwargs
        text = self.render(tokenizer)
        if text is None:
            raise ValueError("the tokenizer has no chat template: pass chat_template='<a Jinja template>', or use "
                             "a plain prompt")
        super().__init__(prompt=text, prompt_token_ids=tokenizer.encode(text, add_special_tokens=False))

    def render(self, tokenizer) -> str | None:
        """The conversation in `tokenizer`'s chat template (or the explicit one); None when it has none."""
        if self.chat_template is None and not getattr(tokenizer, "chat_template", None):
            return None
        return tokenizer.apply_chat_template(self.conversation, tokenize=False, chat_template=self.chat_template,
                                             add_generation_prompt=self.add_generation_prompt,
                                             **self.template_kwargs)
