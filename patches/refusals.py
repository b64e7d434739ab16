"""Families this design cannot serve, and why: keyed by the class of a module they contain.

``find_experts`` finds experts only through Transformers' experts interface; these families either
lack it (their experts need math the exchange does not carry) or would run the exchange on only some
ranks (a collective on some ranks hangs). Refusing names the family, the reason and the way out.
"""

from __future__ import annotations

from torch import nn

_NOT_INTERFACE = "its experts do not use Transformers' experts interface"
_SOME_RANKS = (
    "run only on the ranks whose batch holds that modality, and an exchange on only some ranks would hang "
    "(every rank must take part in every layer's exchange)"
)

REFUSED: dict[str, str] = {
    "Llama4TextExperts": f"{_NOT_INTERFACE}: the router's sigmoid score scales each expert's input (not its "
    "output) and the experts take [E, T, H] batches of all tokens",
    "LongcatFlashExperts": f"{_NOT_INTERFACE}: zero-compute (identity) experts share the routing with the "
    "real experts",
    "DbrxExperts": f"{_NOT_INTERFACE}: flattened expert weights [E*I, H] in a per-expert MLP module",
    "JetMoeParallelExperts": f"{_NOT_INTERFACE}: attention experts (mixture of attention heads) and "
    "per-expert linear layers",
    "SwitchTransformersExperts": f"{_NOT_INTERFACE}: per-expert modules with a capacity limit (tokens over "
    "capacity are dropped per expert)",
    "NllbMoeExperts": f"{_NOT_INTERFACE}: per-expert modules with a capacity limit (tokens over capacity "
    "are dropped per expert)",
    "Step3p7Experts": f"{_NOT_INTERFACE} (no use_experts_implementation)",
    "Ernie4_5_VLMoeMoeBlock": f"its vision experts {_SOME_RANKS}",
    "Qwen3OmniMoeTalkerTextSparseMoeBlock": f"its talker's experts {_SOME_RANKS} (speech output); the "
    "thinker alone (Qwen3OmniMoeThinkerForConditionalGeneration) has no talker",
    "Dots3NoteVisionMoE": f"its vision tower's experts {_SOME_RANKS}",
}


def check(model: nn.Module, family: str) -> None:
    """ValueError naming ``family``, the module and the reason when ``model`` holds a refused module."""
    for name, module in model.named_modules():
        reason = REFUSED.get(type(module).__name__)
        if reason is not None:
            raise ValueError(
                f"hiermoe_hf cannot patch this {family} model: {name} ({type(module).__name__}): {reason}. "
                "Train it without hiermoe_hf (e.g. Transformers' own expert parallelism or FSDP)"
            )
