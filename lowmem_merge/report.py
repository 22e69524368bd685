"""lowmerge_report.json and the model card: what was merged, how, and what it cost."""
from __future__ import annotations

import datetime
import json
import platform
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .io.writer import write_json_atomic, write_new
from .sizes import format_size

REPORT_NAME = "lowmerge_report.json"
CARD_NAME = "README.md"


@dataclass
class Report:
    """The merge's report as written to ``<out>/lowmerge_report.json``."""
    path: Path
    data: dict

    def summary_lines(self) -> list[str]:
        d = self.data
        mem = d["memory"]
        lines = [
            f"merged {len(d['inputs']['experts'])} experts into {d['output']['dir']} with {d['method']}"
            f" ({', '.join(f'{k}={v}' for k, v in d['params'].items()) or 'no parameters'})",
            f"  {d['output']['tensors']} tensors, {format_size(d['output']['bytes'])} in "
            f"{len(d['output']['shards'])} shard(s), dtype {d['output']['dtype']}",
            f"  time {d['timings_s']['total']:.1f} s (read {format_size(d['bytes_read'])}), "
            f"peak memory {format_size(mem['peak_rss_bytes'])}"
            + (f", device {format_size(mem['peak_device_bytes'])}" if mem.get("peak_device_bytes") else ""),
        ]
        lines += [f"  warning: {w}" for w in d.get("warnings", [])]
        return lines


def versions() -> dict[str, str]:
    import safetensors
    import torch
    return {"lowmerge": __version__, "torch": torch.__version__, "safetensors": safetensors.__version__,
            "python": platform.python_version(), "cuda": str(torch.version.cuda)}


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def model_card(data: dict) -> str:
    """README.md for the Hub: a merged model (transformers), or a merged LoRA adapter (peft, with how to load it)."""
    experts = "\n".join(f"- `{e['path']}`" for e in data["inputs"]["experts"])
    params = ", ".join(f"`{k}={v}`" for k, v in data["params"].items()) or "none"
    adapter = data["output"].get("format") == "peft"
    header = (f"library_name: peft\nbase_model: {json.dumps(data['inputs']['base']['path'])}" if adapter
              else "library_name: transformers")
    title = "Merged LoRA adapter" if adapter else "Merged model"
    load = ("\nLoad it onto its base: `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), "
            "THIS_DIR)`.\n" if adapter else "")
    return f"""---
{header}
tags: [merge, lowmerge]
---
# {title}

Made with lowmerge {data['versions']['lowmerge']} on {data['created']}.

- method: `{data['method']}` (parameters: {params})
- base: `{data['inputs']['base']['path']}`
- experts:
{experts}
- output dtype: {data['output']['dtype']}
{load}
`lowmerge_report.json` beside this file holds the inputs' sizes and header hashes, per-tensor statistics, timings
and peak memory.
"""


def write_report(out_dir: Path, data: dict) -> Report:
    """The card, then the report (which says the merge is done) under a temporary name, renamed.

    Paths that are not UTF-8 (bytes kept as surrogates) appear escaped: writing them must not fail after every
    shard is written."""
    path = out_dir / REPORT_NAME
    write_new(out_dir / CARD_NAME, model_card(data).encode("utf-8", "backslashreplace"))
    write_json_atomic(path, data)
    return Report(path, data)
