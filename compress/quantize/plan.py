"""The per-layer precision plan: which bits each linear layer gets. Pure; no model needed, only names."""

from __future__ import annotations

import re

KEEP = 16  # "skip" and 16 both mean: left in the model's own floating-point dtype


def _ignored(name: str, patterns: list[str]) -> bool:
    """llm-compressor's ignore convention: `re:PATTERN` is a regex, anything else an exact name or suffix."""
    for pattern in patterns:
        if pattern.startswith("re:") and re.search(pattern[3:], name):
            return True
        if name == pattern or name.endswith("." + pattern):
            return True
    return False


def resolve_plan(layer_names: list[str], bits: int, ignore: list[str], overrides: list) -> dict[str, int]:
    """layer -> bits for every linear layer: ignored layers keep 16, else the first matching override, else `bits`."""
    plan = {}
    for name in layer_names:
        if _ignored(name, ignore):
            plan[name] = KEEP
            continue
        rule = next((rule for rule in overrides if re.search(rule.match, name)), None)
        plan[name] = bits if rule is None else (KEEP if rule.bits == "skip" else int(rule.bits))
    return plan


def plan_summary(plan: dict[str, int]) -> dict[str, int]:
    """How many layers get each precision, e.g. {"4": 12, "8": 4, "16": 1}."""
    counts: dict[str, int] = {}
    for bits in plan.values():
        counts[str(bits)] = counts.get(str(bits), 0) + 1
    return dict(sorted(counts.items(), key=lambda item: int(item[0])))


def keeps_decoder_layers(plan: dict[str, int]) -> bool:
    """Whether the plan leaves any linear layer other than the head in floating point."""
    return any(bits == KEEP for layer, bits in plan.items() if layer != "lm_head")


DECODER_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:.+\.)?([^.]+)$")  # model.layers.7.mlp.down_proj -> 7, down_proj


def plan_runs(plan: dict[str, int]) -> list[str]:
    """The plan in words: consecutive decoder layers whose modules get the same bits form one run, e.g.
    ["layers 0–39: qkv_proj, o_proj, gate_up_proj 4 bits; down_proj 8 bits", "lm_head kept"]."""
    per_layer: dict[int, list[tuple[str, int]]] = {}
    others: list[tuple[str, int]] = []
    for name, bits in plan.items():
        match = DECODER_LAYER.search(name)
        if match:
            per_layer.setdefault(int(match[1]), []).append((match[2], bits))
        else:
            others.append((name, bits))
    runs: list[list] = []  # [first layer, last layer, (module, bits) of each]
    for index in sorted(per_layer):
        modules = per_layer[index]
        if runs and runs[-1][1] == index - 1 and runs[-1][2] == modules:
            runs[-1][1] = index
        else:
            runs.append([index, index, modules])
    lines = [f"{'layer' if first == last else 'layers'} {first}{'' if first == last else f'–{last}'}: {_by_bits(modules)}"
             for first, last, modules in runs]
    return lines + ([_by_bits(others)] if others else [])


def _by_bits(modules: list[tuple[str, int]]) -> str:
    """"qkv_proj, o_proj 4 bits; down_proj 8 bits; lm_head kept", modules grouped by bits in their first order
    (a GGUF plan names types instead: "qkv_proj, o_proj Q4_K_M; down_proj Q8_0")."""
    groups: dict[int, list[str]] = {}
    for name, bits in modules:
        groups.setdefault(bits, []).append(name)
    return "; ".join(", ".join(names) + (" kept" if bits == KEEP else f" {bits}" if isinstance(bits, str) else f" {bits} bits")
                     for bits, names in groups.items())
