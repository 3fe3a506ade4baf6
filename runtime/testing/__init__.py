"""Generated tiny weights and pytest helpers for the project's own tests (not shipped in the wheel)."""


def tiny_name(model_type: str) -> str:
    """The name a generated checkpoint of ``model_type`` goes by in the tests' and the
    benchmarks' catalogs: "qwen2_5_vl" -> "tiny-qwen2-5-vl"."""
    return "tiny-" + model_type.replace("_", "-")
