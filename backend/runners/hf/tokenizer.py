"""A transformers tokenizer as datasets see it (the PromptTokenizer protocol)."""

from __future__ import annotations


class HFTokenizer:
    """A transformers tokenizer as datasets see it (the PromptTokenizer protocol).

    `use_chat_template` is the default rendering (None: the template when the tokenizer
    has one); `render`, `prompt_ids` and `count_prompt` take a per-call `chat_template`
    that overrides it. A tokenizer without a template always renders plain text."""

    def __init__(self, tokenizer, max_length: int, use_chat_template: bool | None = None):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        self.use_chat_template = self.has_template if use_chat_template is None else (
            use_chat_template and self.has_template)

    def templated(self, chat_template: bool | None) -> bool:
        """Whether prompts asked for with `chat_template` (None: the default) are in it."""
        if chat_template is None:
            return self.use_chat_template
        return chat_template and self.has_template

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def render(self, user_message: str, chat_template: bool | None = None) -> str:
        if not self.templated(chat_template):
            return user_message
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": user_message}], tokenize=False,
            add_generation_prompt=True)

    def render_chat(self, messages: list[dict[str, str]],
                    add_generation_prompt: bool = True) -> str:
        """See PromptTokenizer.render_chat. As lm-evaluation-harness's HF backend: a
        template that refuses a system message gets the conversation without it."""
        import jinja2

        if not self.has_template:
            raise ValueError("the model's tokenizer has no chat template")

        def apply(history: list[dict[str, str]]) -> str:
            return self.tokenizer.apply_chat_template(
                history, tokenize=False, add_generation_prompt=add_generation_prompt,
                continue_final_message=not add_generation_prompt)

        try:
            return apply(messages)
        except jinja2.exceptions.TemplateError:
            return apply([m for m in messages if m["role"] != "system"])

    def prompt_ids(self, prompt: str, chat_template: bool | None = None) -> list[int]:
        # A rendered chat template already holds its special tokens (BOS…).
        return self.tokenizer.encode(prompt,
                                     add_special_tokens=not self.templated(chat_template))

    def count_prompt(self, prompt: str, chat_template: bool | None = None) -> int:
        return len(self.prompt_ids(prompt, chat_template))

    def prefix_token_text(self) -> str | None:
        """BOS, else EOS, as text (see Runner.prefix_token_text)."""
        return (getattr(self.tokenizer, "bos_token", None)
                or getattr(self.tokenizer, "eos_token", None))
