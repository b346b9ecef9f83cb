"""Targets and the Markdown report, from a results dict alone (pure: no I/O, no measuring)."""

from __future__ import annotations

from benchmarks.maths import target

DASH = "—"


def targets(results: dict) -> list[dict]:
    """The issue's targets, reported against (never asserted). A figure not measured is None."""
    decode = results.get("decode", {}).get("artifacts", {})
    int4 = decode.get("ONNX int4", {})
    use = results.get("bandwidth", {}).get("artifacts", {}).get("ONNX int4", {}).get("use", {})
    quantization = results.get("overhead", {}).get("quantization", {})
    verification = results.get("overhead", {}).get("verification", {})
    awq = results.get("awq", {}).get("ratios", [])
    return [
        target("ONNX int4 decode ÷ fp32 PyTorch decode", int4.get("decode_speedup"), 3.0, at_least=True),
        target("ONNX int4 achieved bandwidth ÷ measured bound", use.get("share_of_bound"), 0.60, at_least=True),
        target("compress run quantize stage ÷ bare oneshot (time)", quantization.get("quantize_time_ratio"), 1.15, at_least=False),
        target("verification pass ÷ raw onnxruntime-genai forward (time)", verification.get("ratio"), 1.30, at_least=False),
        *(target(f"AWQ ÷ GPTQ seconds per layer, {row['width']} width, {row['tokens']} tokens", row["ratio"], 1.0, at_least=False)
          for row in awq),
    ]


def _num(value, digits: int = 1, suffix: str = "") -> str:
    if value is None:
        return DASH
    return f"{value:,.{digits}f}{suffix}"


def _spread(figure: dict | None, digits: int = 1) -> str:
    if not figure:
        return DASH
    return f"{_num(figure['tps'], digits)} ({_num(figure['min'], digits)}–{_num(figure['max'], digits)})"


def _gb(value) -> str:
    return DASH if value is None else f"{value / 1e9:.2f} GB"


def _share(value) -> str:
    return DASH if value is None else f"{100 * value:.0f}%"


def _verdict(met) -> str:
    return {True: "met", False: "**missed**", None: "not measured"}[met]


def render(results: dict) -> str:
    meta = results["meta"]
    env = meta["environment"]
    versions = ", ".join(f"{name} {version}" for name, version in env["versions"].items())
    lines = [
        f"# Benchmarks {meta['date']} on {env['host']}",
        "",
        f"{env['cpu']}, {env['cores']} cores, {env['threads']} threads, {env['memory_gib']} GiB; Python {env['python']}; "
        f"{versions}. Load average at start {env['load_average_at_start']}. Total {_num(meta.get('seconds'), 0)} s "
        f"(`{meta['command']}`). Ratios are taken side by side in this run; absolute figures drift between runs.",
        "",
    ]
    lines += _targets_section(results.get("targets", []))
    if "decode" in results:
        lines += _decode_section(results["decode"], results.get("bandwidth"))
    elif "bandwidth" in results:
        lines += _bandwidth_only(results["bandwidth"])
    if "overhead" in results:
        lines += _overhead_section(results["overhead"])
    if "scaling" in results:
        lines += _scaling_section(results["scaling"])
    if "llama-cpp" in results:
        from benchmarks.llama_cpp import markdown as llama_cpp_markdown

        lines += llama_cpp_markdown(results["llama-cpp"])
    if "fullsize" in results:
        from benchmarks.fullsize import markdown

        lines += markdown(results["fullsize"])
    if "automix" in results:
        from benchmarks.automix import markdown as automix_markdown

        lines += automix_markdown(results["automix"])
    if "awq" in results:
        from benchmarks.awq import markdown as awq_markdown

        lines += awq_markdown(results["awq"]) + [""]
    for name, error in results.get("errors", {}).items():
        lines += [f"**{name} failed**: {error}", ""]
    return "\n".join(lines).rstrip() + "\n"


def _targets_section(found: list[dict]) -> list[str]:
    lines = ["## Targets (reported, not asserted)", "", "| target | measured | threshold | verdict |", "|---|---:|---:|---|"]
    for item in found:
        sign = "≥" if item["at_least"] else "≤"
        lines.append(f"| {item['name']} | {_num(item['measured'], 2)} | {sign} {item['threshold']:g} | {_verdict(item['met'])} |")
    return [*lines, ""]


def _decode_section(decode: dict, bandwidth: dict | None) -> list[str]:
    model, settings = decode["model"], decode["settings"]
    lines = [
        "## Speed, memory and size",
        "",
        f"Phi-4-mini width, {model['layers']} layers, random weights ({model['parameters'] / 1e6:,.0f}M parameters, "
        f"vocab {model['vocab_size']:,}). Prefill at {' and '.join(map(str, settings['prompt_lengths']))} prompt tokens; "
        f"decode of {settings['new_tokens']} new tokens after {settings['prompt_lengths'][0]}; median (min–max) of "
        f"{settings['runs']} runs after one warm-up; tok/s. Others' CPU: share of the machine's CPU time other "
        "processes used while this artifact was measured (0% = it ran alone); where it is high, that row is slowed.",
        "",
    ]
    machine = (bandwidth or {}).get("machine")
    header = "| artifact | runtime | size | prefill 128 | prefill 512 | decode | decode × baseline | peak RSS | others' CPU |"
    rule = "|---|---|---:|---:|---:|---:|---:|---:|---:|"
    if machine:
        header += " bytes/token | bound tok/s | achieved | of bound |"
        rule += "---:|---:|---:|---:|"
    lines += [header, rule]
    for name, entry in decode["artifacts"].items():
        row = (f"| {name} | {entry['runtime']} | {_gb(entry['size_bytes'])} | {_spread(entry.get('prefill_128'))} | "
               f"{_spread(entry.get('prefill_512'))} | {_spread(entry.get('decode'), 2)} | {_num(entry.get('decode_speedup'), 2, '×')} | "
               f"{_num(entry['peak_rss_mb'], 0, ' MiB')} | {_share(entry.get('others_cpu'))} |")
        if machine:
            used = bandwidth["artifacts"].get(name, {})
            stored = used.get("bytes_per_token", {}).get("stored", {}).get("total")
            share = used.get("use", {})
            row += (f" {_gb(stored)} | {_num(used.get('bound_tps'), 1)} | {_num(share.get('achieved_gb_per_s'), 1, ' GB/s')} | "
                    f"{_num(None if share.get('share_of_bound') is None else 100 * share['share_of_bound'], 0, '%')} |")
        lines.append(row)
    lines.append("")
    if machine:
        kernels = ", ".join(f"{kernel} {value:.1f}" for kernel, value in machine["gb_per_s"].items())
        lines += [f"Measured bandwidth (GB/s, best of several over {machine['array_mib']} MiB arrays): {kernels}; bound = "
                  f"{machine['bound_kernel']} {machine['bound_gb_per_s']:.1f} GB/s. Bytes/token are the artifact's stored "
                  f"tensors (linear layers with scales and zeros, the whole LM head, one embedding row) plus the KV cache "
                  f"at a mean context of {bandwidth['decode_context']:g} tokens.", ""]
        single = bandwidth.get("int4_one_thread")
        if single:
            lines += [f"ONNX int4 decode on one thread: {_spread(single['decode'], 2)} tok/s; on all threads "
                      f"{_num(single['speedup_all_threads'], 2, '×')} that. Decode that grows with cores is bound by compute "
                      f"(unpacking int4, int8 dot products), not by memory; read-only kernels reach "
                      f"{_num(max(v for k, v in machine['gb_per_s'].items() if k.endswith('read')), 1)} GB/s here.", ""]
        as_run = {name: used for name, used in bandwidth["artifacts"].items()
                  if used["bytes_per_token"]["as_run"]["total"] != used["bytes_per_token"]["stored"]["total"]}
        for name, used in as_run.items():
            share = used.get("use_as_run", {}).get("share_of_bound")
            lines += [f"{name}: its runtime holds the layers dequantized to fp32, so it reads "
                      f"{_gb(used['bytes_per_token']['as_run']['total'])} per token, not the stored "
                      f"{_gb(used['bytes_per_token']['stored']['total'])}; against that, bound "
                      f"{_num(used['bound_tps_as_run'], 1)} tok/s, achieved {_num(None if share is None else 100 * share, 0, '%')} of it.", ""]
    return lines


def _bandwidth_only(bandwidth: dict) -> list[str]:
    machine = bandwidth["machine"]
    lines = ["## Bandwidth bound", "", f"Bound {machine['bound_gb_per_s']:.1f} GB/s ({machine['bound_kernel']}).", "",
             "| artifact | bytes/token | bound tok/s |", "|---|---:|---:|"]
    for name, used in bandwidth["artifacts"].items():
        lines.append(f"| {name} | {_gb(used['bytes_per_token']['stored']['total'])} | {_num(used['bound_tps'], 1)} |")
    return [*lines, ""]


def _overhead_section(overhead: dict) -> list[str]:
    lines = ["## Overhead of our machinery", ""]
    quantization = overhead.get("quantization")
    if quantization:
        bare, ours = quantization["bare"], quantization["compress_run"]
        lines += [
            f"GPTQ W4 g128 on {quantization['model']}, {quantization['calibration']['samples']}×"
            f"{quantization['calibration']['seq_len']} calibration tokens.",
            "",
            "| | compress run | bare llm-compressor | ratio |",
            "|---|---:|---:|---:|",
            f"| quantize stage (oneshot seconds) | {_num(ours['oneshot_seconds'], 2)} | {_num(bare['oneshot_seconds'], 2)} "
            f"(runs: {', '.join(_num(x, 2) for x in bare.get('oneshot_seconds_each', []))}) | "
            f"{_num(quantization['quantize_time_ratio'], 2, '×')} |",
            f"| whole process (seconds) | {_num(ours['run_seconds'], 1)} | {_num(bare['script_seconds'], 1)} | "
            f"{_num(quantization['whole_time_ratio'], 2, '×')} |",
            f"| peak RSS (MiB, largest process) | {_num(ours['peak_rss_mb'], 0)} | {_num(bare['peak_rss_mb'], 0)} | "
            f"{_num(quantization['peak_rss_ratio'], 2, '×')} |",
            "",
            "The whole run also tokenizes, evaluates the baseline, exports, verifies in fresh processes and writes the "
            "report; the bare script loads, calibrates and saves (mean of a run before and one after compress run).",
            "",
        ]
    verification = overhead.get("verification")
    if verification:
        lines += [f"Verification over {verification['windows']}×{verification['seq_len']} tokens of {verification['artifact']}: "
                  f"worker evaluation {_num(verification['worker_evaluate_seconds'], 2)} s vs raw forward "
                  f"{_num(verification['raw_forward_seconds'], 2)} s = {_num(verification['ratio'], 2, '×')}.", ""]
    return lines


def _scaling_section(scaling: dict) -> list[str]:
    calibration = scaling["calibration"]
    lines = ["## GPTQ memory and time by depth", "",
             f"compress's quantize_gptq, W4 g{calibration['group_size']}, {calibration['calibration_samples']}×"
             f"{calibration['calibration_seq_len']} random tokens, {scaling['stored_dtype']} weights; peak RSS of its process.", "",
             "| width | layers | parameters | peak RSS | seconds | estimate_memory (quantize) | others' CPU |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, found in scaling["families"].items():
        for item in found["slices"]:
            lines.append(f"| {name} | {item['layers']} | {item['parameters'] / 1e6:,.0f}M | {_num(item['peak_rss_mb'], 0, ' MiB')} | "
                         f"{_num(item['quantize_seconds'], 0)} | {_num(item['estimate_mb'], 0, ' MiB')} | {_share(item.get('others_cpu'))} |")
        for item in found.get("skipped", []):
            lines.append(f"| {name} | {item['layers']} | {DASH} | not measured: {item['reason']} | {DASH} | {DASH} | {DASH} |")
    lines.append("")
    check = scaling.get("tokens_check")
    if check:
        lines.append(f"- calibration tokens: {check['width']}, {check['layers']} layer, {check['calibration_samples']}×"
                     f"{calibration['calibration_seq_len']} instead of {calibration['calibration_samples']}×"
                     f"{calibration['calibration_seq_len']}: peak RSS {_num(check['growth_mb'], 0, ' MiB')} more; "
                     f"estimate_memory adds {_num(check['estimate_growth_mb'], 0, ' MiB')}.")
    for name, found in scaling["families"].items():
        if "peak_rss_mb" not in found:
            lines.append(f"- {name}: fewer than two depths measured, so no per-layer fit.")
            continue
        rss, seconds, full = found["peak_rss_mb"], found["quantize_seconds"], found["full_depth"]
        lines.append(
            f"- {name}: {_num(rss['per_layer'], 0)} MiB and {_num(seconds['per_layer'], 0)} s per layer (fit residual ≤ "
            f"{100 * rss['max_residual']:.0f}% / {100 * seconds['max_residual']:.0f}%); at {found['full_layers']} layers "
            f"({full['parameters'] / 1e9:.2f}B parameters): {_num(rss['at_full_depth'] / 1024, 1)} GiB, "
            f"{_num(seconds['at_full_depth'] / 60, 0)} min; estimate_memory says {_num(full['estimate_mb'] / 1024, 1)} GiB "
            f"({_num(found['estimate_ratio_at_full_depth'], 2, '×')} the extrapolation).")
    return [*lines, ""]
