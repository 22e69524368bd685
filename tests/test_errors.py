"""Every bad input through the real CLI: one `error: PATH: TENSOR: message` line + a hint, a non-zero exit, no
traceback (unless --debug), and never an output directory that looks complete."""
from __future__ import annotations

import json
import os
import resource
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, run_cli, run_cli_many
from safetensors.torch import load_file, save_file

from lowmem_merge.demo import build_example

SHARD = "10KB"        # the tiny model (41 KB) then spans several output shards
Q0 = "model.layers.0.self_attn.q_proj.weight"


def merge(base: Path, experts: list[Path], out: Path, *extra: str) -> subprocess.CompletedProcess:
    """A merge through the CLI; an elementwise method unless ``extra`` names another (the last -m wins)."""
    return run_cli("merge", base, *experts, "-o", out, "-q", "-m", "task_arithmetic", *extra)


def user_error(proc: subprocess.CompletedProcess, *needles: object) -> str:
    """Check the CLI's error contract and return the error line; each of ``needles`` must appear in it."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines and lines[0].startswith("error: "), proc.stderr
    assert len(lines) == 2 and lines[1].startswith("hint: ") and len(lines[1]) > len("hint: "), proc.stderr
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
    return lines[0]


def looks_complete(out: Path) -> list[str]:
    """Files whose presence would tell a user or a loader that the merge finished."""
    if not out.exists():
        return []
    names = [p.name for p in out.iterdir()]
    return [n for n in names if n in ("model.safetensors", "model.safetensors.index.json", "lowmerge_report.json")
            or (n.startswith("model-") and n.endswith(".safetensors"))]


def edit(path: Path, change) -> None:
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def shard_bytes(out: Path) -> dict[str, bytes]:
    """The merged weights as bytes: every shard and the index (the report differs in timings)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())
            if p.name.endswith(".safetensors") or p.name.endswith(".index.json")}


# -- headers: shapes and names ------------------------------------------------------------------------------------

def test_shape_mismatch_on_a_linear_weight(tiny, tmp_path):
    base, experts = tiny
    file = experts[1] / "model.safetensors"
    edit(file, lambda t: t.update({Q0: torch.zeros(32, 16, dtype=torch.bfloat16)}))
    out = tmp_path / "out"
    line = user_error(merge(base, experts, out), f"error: {file}: {Q0}: ")
    assert "[32, 16]" in line and "[32, 32]" in line
    assert not out.exists()     # found by the plan, before any output byte


def test_expert_with_another_vocabulary_names_both_sizes(tiny, tmp_path):
    base, experts = tiny
    file = experts[2] / "model.safetensors"

    def grow(t):
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            t[name] = torch.cat([t[name], torch.zeros(16, 32, dtype=torch.bfloat16)])
    edit(file, grow)
    out = tmp_path / "out"
    line = user_error(merge(base, experts, out), f"error: {base}: expert 2 ({experts[2]}) has 80 vocabulary rows, "
                      "the base has 64: matching rows by token needs the base's tokenizer")
    assert "tokenizer files" in line
    assert not out.exists()


def test_tensor_missing_from_an_expert(tiny, tmp_path):
    base, experts = tiny
    name = "model.layers.1.mlp.down_proj.weight"
    edit(experts[0] / "model.safetensors", lambda t: t.pop(name))
    out = tmp_path / "out"
    user_error(merge(base, experts, out), f"error: {experts[0]}: {name}: ", "missing")
    assert not out.exists()


def test_tensor_the_base_lacks_is_an_error(tiny, tmp_path):
    base, experts = tiny
    name = "model.layers.0.self_attn.extra.weight"
    edit(experts[1] / "model.safetensors", lambda t: t.update({name: torch.ones(4, 4, dtype=torch.bfloat16)}))
    out = tmp_path / "out"
    user_error(merge(base, experts, out), f"error: {experts[1]}: {name}: ", "not in the base")
    assert not out.exists()


def test_extra_head_is_kept_beside_the_model(tiny, tmp_path):
    base, experts = tiny
    head = torch.randn(3, 32).to(torch.bfloat16)
    edit(experts[1] / "model.safetensors", lambda t: t.update({"score.weight": head}))
    out = tmp_path / "out"
    proc = merge(base, experts, out)
    assert proc.returncode == 0, proc.stderr
    heads = sorted((out / "heads").glob("expert*.safetensors"))
    assert [h.name for h in heads] == ["expert1-expert1.safetensors"]
    assert torch.equal(load_file(heads[0])["score.weight"], head)
    assert set(load_file(out / "model.safetensors")) == set(load_file(base / "model.safetensors"))


# -- data: NaN / Inf, found mid-run --------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nan_or_inf_stops_the_run_mid_way(tiny, tmp_path, bad):
    base, experts = tiny
    name = "lm_head.weight"                     # the last tensor: earlier shards are already written
    edit(experts[2] / "model.safetensors", lambda t: t[name].__setitem__((5, 7), bad))
    out = tmp_path / "out"
    user_error(merge(base, experts, out, "--shard-size", SHARD), f"error: {experts[2]}: {name}: ", "NaN or Inf")
    manifest = json.loads((out / "lowmerge-manifest.json").read_text())
    assert manifest["shards"], "the error should come after some shards were written"
    assert looks_complete(out) == []
    assert not (out / "README.md").exists() and not (out / "config.json").exists()


# -- files that are not (whole) safetensors --------------------------------------------------------------------------

def test_truncated_file(tiny, tmp_path):
    base, experts = tiny
    file = experts[0] / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:-100])
    out = tmp_path / "out"
    line = user_error(merge(base, experts, out), f"error: {file}: lm_head.weight: ", "truncated")
    assert str(len(data) - 100) in line
    assert not out.exists()


@pytest.mark.parametrize("content", [os.urandom(5000), b"this is a text file, not weights\n" * 40],
                         ids=["random-bytes", "text"])
def test_not_a_safetensors_file(tiny, tmp_path, content):
    base, experts = tiny
    file = tmp_path / "expert.safetensors"
    file.write_bytes(content)
    out = tmp_path / "out"
    user_error(merge(base, [experts[0], file], out), f"error: {file}: ", "not a safetensors file")
    assert not out.exists()


def test_absurd_header_length(tiny, tmp_path):
    base, experts = tiny
    file = experts[1] / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(struct.pack("<Q", 2**62) + data[8:])
    out = tmp_path / "out"
    user_error(merge(base, experts, out), f"error: {file}: ", "header length", str(2**62))
    assert not out.exists()


# -- sharded inputs --------------------------------------------------------------------------------------------------

def shard_model(model_dir: Path, shard_names: tuple[str, str]) -> dict[str, list[str]]:
    """Rewrite ``model_dir`` as two shards named in the index as ``shard_names``; returns shard -> tensors."""
    tensors = load_file(model_dir / "model.safetensors")
    names = list(tensors)
    split = {shard_names[0]: names[: len(names) // 2], shard_names[1]: names[len(names) // 2:]}
    for shard, members in split.items():
        target = Path(shard) if Path(shard).is_absolute() else model_dir / shard
        save_file({n: tensors[n] for n in members}, target, metadata={"format": "pt"})
    (model_dir / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {n: shard for shard, members in split.items() for n in members}}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    return split


def test_sharded_input_whose_index_names_a_missing_shard(tiny, tmp_path):
    base, experts = tiny
    split = shard_model(experts[0], ("a.safetensors", "b.safetensors"))
    (experts[0] / "b.safetensors").unlink()
    index = experts[0] / "model.safetensors.index.json"
    out = tmp_path / "out"
    user_error(merge(base, experts, out), f"error: {index}: {sorted(split['b.safetensors'])[0]}: ",
               "missing shard", "b.safetensors")
    assert not out.exists()


def test_sharded_input_works(tiny, tmp_path):
    """The control for the two tests around it: the same shards, inside the directory, merge fine."""
    base, experts = tiny
    shard_model(experts[0], ("a.safetensors", "b.safetensors"))
    proc = merge(base, experts, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_index_naming_a_shard_outside_the_model_directory(tiny, tmp_path, where):
    base, experts = tiny
    outside = experts[0].parent / "outside.safetensors"
    shard = "../outside.safetensors" if where == "relative" else str(outside)
    shard_model(experts[0], ("a.safetensors", shard))
    assert outside.is_file()     # a real, valid file: only its place is wrong
    index = experts[0] / "model.safetensors.index.json"
    out = tmp_path / "out"
    user_error(merge(base, experts, out), f"error: {index}: ", "outside the model directory", shard)
    assert not out.exists()


# -- paths and the output directory ----------------------------------------------------------------------------------

def test_output_directory_not_empty_is_refused(tiny, tmp_path):
    base, experts = tiny
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    user_error(merge(base, experts, out), f"error: {out}: ", "not empty")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_force_replaces_a_previous_output_and_keeps_foreign_files(tiny, tmp_path):
    base, experts = tiny
    edit(experts[1] / "model.safetensors",
         lambda t: t.update({"score.weight": torch.ones(3, 32, dtype=torch.bfloat16)}))
    out = tmp_path / "out"
    assert merge(base, experts, out, "--shard-size", SHARD).returncode == 0
    assert (out / "heads").is_dir() and (out / "model.safetensors.index.json").is_file()
    (out / "notes.txt").write_text("mine")
    plain = [experts[0], experts[2]]                        # no heads this time, one shard, another method
    proc = merge(base, plain, out, "-m", "average", "--force")
    assert proc.returncode == 0, proc.stderr
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / "heads").exists()
    assert not list(out.glob("model-*")) and not (out / "model.safetensors.index.json").exists()
    fresh = tmp_path / "fresh"
    assert merge(base, plain, fresh, "-m", "average").returncode == 0
    assert (out / "model.safetensors").read_bytes() == (fresh / "model.safetensors").read_bytes()
    assert json.loads((out / "lowmerge_report.json").read_text())["method"] == "average"


@pytest.mark.parametrize("name", ["model.safetensors", "README.md"])
def test_force_never_overwrites_a_file_lowmerge_did_not_write(tiny, tmp_path, name):
    base, experts = tiny
    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_text("mine")
    user_error(merge(base, experts, out, "--force"), f"error: {out}: ", name)
    assert (out / name).read_text() == "mine"
    assert looks_complete(out) == ([name] if name == "model.safetensors" else [])


def test_file_size_limit_mid_write_then_resume(tiny, tmp_path):
    base, experts = tiny
    ref = tmp_path / "ref"
    assert merge(base, experts, ref, "--shard-size", SHARD).returncode == 0
    index = json.loads((ref / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    sizes = [(ref / s).stat().st_size for s in shards]
    limit = max(sizes) - 1                       # the first shard of the largest size cannot be written
    first_too_big = next(i for i, s in enumerate(sizes) if s > limit)

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lowmem_merge", "merge", base, *experts, "-o", out, "-q", "-m", "task_arithmetic",
           "--shard-size", SHARD]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, env=env, preexec_fn=small_files,
                          timeout=300)
    user_error(proc, f"error: {out / (shards[first_too_big] + '.partial')}: ", "file size limit")
    assert looks_complete(out) == []
    manifest = json.loads((out / "lowmerge-manifest.json").read_text())
    assert sorted(manifest["shards"]) == shards[:first_too_big]

    proc = merge(base, experts, out, "--shard-size", SHARD, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert shard_bytes(out) == shard_bytes(ref)
    report = json.loads((out / "lowmerge_report.json").read_text())
    assert report["output"]["resumed_shards"] == shards[:first_too_big]


# -- PyTorch pickles -------------------------------------------------------------------------------------------------

def test_bin_expert_as_a_plain_state_dict(tiny, tmp_path):
    base, experts = tiny
    binary = tmp_path / "expert1.bin"
    torch.save(load_file(experts[1] / "model.safetensors"), binary)
    from_bin, ref = tmp_path / "from_bin", tmp_path / "ref"
    assert merge(base, [experts[0], binary, experts[2]], from_bin).returncode == 0
    assert merge(base, experts, ref).returncode == 0
    assert (from_bin / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()


class Payload:
    """Unpickling this runs ``open(marker, "w")``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_unsafe_pickle_is_refused_and_never_run(tiny, tmp_path):
    base, experts = tiny
    marker = tmp_path / "pwned"
    binary = tmp_path / "evil.bin"
    state = load_file(experts[1] / "model.safetensors")
    torch.save({**state, "payload": Payload(marker)}, binary)
    out = tmp_path / "out"
    user_error(merge(base, [experts[0], binary], out), f"error: {binary}: ", "weights-only")
    assert not marker.exists()
    assert not out.exists()
    torch.load(binary, weights_only=False)       # the payload is real: an unrestricted load runs it
    assert marker.exists()


# -- options and paths: inputs untouched, so every run starts at once (the CLI's start-up is mostly torch's import) --

MISSING = "no-such-model"
OPTION_CASES: dict[str, tuple[list[str], list[str]]] = {   # id -> (arguments after the inputs, needles)
    "method": (["-m", "nosuch"], ["nosuch", "task_arithmetic", "average"]),
    "param-name": (["-p", "nosuch=1"], ["error: method 'task_arithmetic' has no parameter 'nosuch'"]),
    "param-value": (["-p", "scale=abc"], ["scale", "'abc'", "float"]),
    "param-form": (["-p", "scale"], ["'scale'", "KEY=VALUE"]),
    "shard-size-unit": (["--shard-size", "12XB"], ["--shard-size", "12XB"]),
    "shard-size-zero": (["--shard-size", "0"], ["--shard-size", "positive"]),
    "dtype": (["--dtype", "int3"], ["--dtype", "int3"]),
    "cuda": (["--device", "cuda"], ["'cuda'", "CUDA is not available"]),
    "missing-base": ([], ["no such file"]),
    "missing-expert": ([], ["no such file"]),
    "debug": (["--debug"], []),
    "control": ([], []),
}


@pytest.fixture(scope="module")
def option_runs(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path, Path]]:
    """Every OPTION_CASES run: id -> (finished process, its -o directory, the missing path it names)."""
    root = tmp_path_factory.mktemp("options")
    base, experts = build_example(root / "in", TINY, n_experts=3)
    missing = root / MISSING
    commands = []
    for case, (args, _) in OPTION_CASES.items():
        inputs = {"missing-base": [missing, *experts], "missing-expert": [base, experts[0], missing],
                  "debug": [base, missing]}.get(case, [base, *experts])
        commands.append(["merge", *inputs, "-o", root / f"out-{case}", "-q", "-m", "task_arithmetic", *args])
    procs = run_cli_many(*commands)
    return {case: (proc, root / f"out-{case}", missing) for case, proc in zip(OPTION_CASES, procs)}


@pytest.mark.parametrize("case", [c for c in OPTION_CASES if c not in ("debug", "control")])
def test_bad_option_or_path(option_runs, case):
    if case == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is present")
    proc, out, missing = option_runs[case]
    needles = OPTION_CASES[case][1] + ([f"error: {missing}: "] if case.startswith("missing") else [])
    user_error(proc, *needles)
    assert not out.exists()


def test_unknown_parameter_lists_the_valid_ones(option_runs):
    proc = option_runs["param-name"][0]
    assert proc.stderr.splitlines()[1] == "hint: valid parameters (with defaults): scale=0.4, weights=()"


def test_debug_shows_the_traceback(option_runs):
    proc, _, missing = option_runs["debug"]
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr
    assert f"InputError: {missing}: no such file or directory" in proc.stderr


def test_untouched_inputs_merge_cleanly(option_runs):
    """The control for every test here: the same inputs and options merge with exit 0 and a quiet stderr."""
    proc, out, _ = option_runs["control"]
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert sorted(looks_complete(out)) == ["lowmerge_report.json", "model.safetensors"]


# -- nothing outside the output directory, nothing of the inputs lost ------------------------------------------------

def test_a_symlink_planted_at_a_temporary_name_is_replaced_not_followed(tiny, tmp_path):
    base, experts = tiny
    out = tmp_path / "out"
    assert merge(base, experts, out).returncode == 0
    victims = {name: tmp_path / f"victim-{i}" for i, name in enumerate(
        ["lowmerge-manifest.json.partial", "model.safetensors.partial", "lowmerge_report.json.partial"])}
    for name, victim in victims.items():
        (out / name).symlink_to(victim)
    (out / "config.json").unlink()
    (out / "config.json").symlink_to(tmp_path / "victim-config")   # a final name a previous run wrote
    proc = merge(base, experts, out, "--force")
    assert proc.returncode == 0, proc.stderr
    assert not any(v.exists() for v in victims.values()) and not (tmp_path / "victim-config").exists()
    assert not any(p.is_symlink() for p in out.iterdir())
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "lowmerge_report.json",
                                                     "model.safetensors"]


@pytest.mark.parametrize("flag", ["--force", "--resume"])
def test_force_or_resume_refuse_a_directory_lowmerge_did_not_write(tiny, tmp_path, flag):
    base, experts = tiny
    out = tmp_path / "out"
    out.mkdir()
    (out / "lowmerge-manifest.json.partial").symlink_to(tmp_path / "victim")
    (out / "notes.txt").write_text("mine")
    user_error(merge(base, experts, out, flag), f"error: {out}: ", "holds no lowmerge output", "notes.txt")
    assert sorted(p.name for p in out.iterdir()) == ["lowmerge-manifest.json.partial", "notes.txt"]
    assert not (tmp_path / "victim").exists()


def test_force_refuses_an_output_that_is_one_of_the_inputs(tiny, tmp_path):
    """`merge B E0 E1 -o prev`, then `merge B prev E1 -o prev --force`: the second run must not delete prev."""
    base, experts = tiny
    prev = tmp_path / "prev"
    assert merge(base, experts[:2], prev).returncode == 0
    before = {p.name: p.read_bytes() for p in prev.iterdir()}
    user_error(merge(base, [prev, experts[1]], prev, "--force"), f"error: {prev}: ", "is the input", str(prev))
    assert {p.name: p.read_bytes() for p in prev.iterdir()} == before


@pytest.mark.parametrize("where", ["base", "inside-expert", "contains-expert", "via-symlink", "calib"])
def test_output_inside_or_around_an_input_is_refused_before_anything_is_written(tiny, tmp_path, where):
    base, experts = tiny
    link = tmp_path / "link"
    link.symlink_to(experts[0])
    out, needle, extra = {
        "base": (base, "is the input", []),
        "inside-expert": (experts[1] / "sub", "lies inside the input", []),
        "contains-expert": (experts[0].parent, "contains the input", []),
        "via-symlink": (link, "is the input", []),
        "calib": (tmp_path / "calib-out", "contains the input", []),
    }[where]
    if where == "calib":
        out.mkdir()
        (out / "task.txt").write_text("some text\n")
        extra = ["-m", "regmean", "--calib", out / "task.txt", "--calib", out / "task.txt", "--calib",
                 out / "task.txt"]
    listing = {p: sorted(q.name for q in p.iterdir()) for p in [base, *experts, tmp_path]}
    user_error(merge(base, experts, out, "--force", *extra), f"error: {out}: ", needle)
    assert {p: sorted(q.name for q in p.iterdir()) for p in listing} == listing


def test_output_under_a_regular_file_is_one_line(tiny, tmp_path):
    base, experts = tiny
    (tmp_path / "file").write_text("x")
    user_error(merge(base, experts, tmp_path / "file" / "out"), f"error: {tmp_path / 'file' / 'out'}: ",
               "Not a directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_unwritable_output_is_one_line(tiny, tmp_path):
    base, experts = tiny
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        user_error(merge(base, experts, parent / "out"), "error: ", "Permission denied")
    finally:
        parent.chmod(0o755)


def test_a_path_that_is_not_utf8_is_handled_to_the_end(tiny, tmp_path):
    base, experts = tiny
    odd = tmp_path / os.fsdecode(b"expert-\xff")
    odd.mkdir()
    (odd / "model.safetensors").write_bytes((experts[0] / "model.safetensors").read_bytes())
    out = tmp_path / "out"
    proc = merge(base, [odd, experts[1]], out)
    assert proc.returncode == 0, proc.stderr
    assert sorted(looks_complete(out)) == ["lowmerge_report.json", "model.safetensors"]
    assert "expert-\\udcff" in (out / "README.md").read_text()


def test_zero_element_tensors_keep_the_base_value(tiny, tmp_path):
    base, experts = tiny
    empty = {"model.extra.weight": (0, 32), "model.extra2.weight": (32, 0), "model.extra.bias": (0,)}
    for d in [base, *experts]:
        edit(d / "model.safetensors", lambda t: t.update({n: torch.zeros(s, dtype=torch.bfloat16)
                                                          for n, s in empty.items()}))
    for method in ("wudi_cfs", "ties", "dare"):
        out = tmp_path / method
        proc = merge(base, experts, out, "-m", method)
        assert proc.returncode == 0, proc.stderr
        merged = load_file(out / "model.safetensors")
        assert {n: tuple(merged[n].shape) for n in empty} == empty


# -- malformed files: one line each ----------------------------------------------------------------------------------

def _raw_safetensors(path: Path, header: bytes, data: bytes) -> None:
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


RAW_HEADERS = {   # case -> (header, data, what the error line must say)
    "nested": (b'{"a":' * 200_000 + b"1" + b"}" * 200_000, b"", "not JSON"),
    "negative-shape": (b'{"w":{"dtype":"F32","shape":[-2,-2],"data_offsets":[0,16]}}', bytes(16), "non-negative"),
    "float-shape": (b'{"w":{"dtype":"F32","shape":[2.5],"data_offsets":[0,8]}}', bytes(8), "non-negative"),
    "duplicate": (b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
                  b'"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', bytes(8), "names 'w' twice"),
    "overlap": (b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
                b'"v":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}', bytes(12), "overlap"),
    "gap": (b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}', bytes(16), "gap"),
}


@pytest.mark.parametrize("case", RAW_HEADERS)
def test_malformed_safetensors_header(tiny, tmp_path, case):
    base, experts = tiny
    header, data, needle = RAW_HEADERS[case]
    file = tmp_path / "bad.safetensors"
    _raw_safetensors(file, header, data)
    out = tmp_path / "out"
    user_error(merge(base, [experts[0], file], out), f"error: {file}: ", needle)
    assert not out.exists()


def test_index_whose_weight_map_value_is_not_a_string(tiny, tmp_path):
    base, experts = tiny
    split = shard_model(experts[0], ("a.safetensors", "b.safetensors"))
    index = experts[0] / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    victim = sorted(split["b.safetensors"])[0]
    data["weight_map"][victim] = ["b.safetensors"]
    index.write_text(json.dumps(data))
    user_error(merge(base, experts, tmp_path / "out"), f"error: {index}: {victim}: ", "not a file name")


@pytest.mark.parametrize("content", ["[1, 2]", "[" * 100_000 + "]" * 100_000], ids=["list", "nested"])
def test_config_json_that_is_not_an_object(tiny, tmp_path, content):
    base, experts = tiny
    (experts[1] / "config.json").write_text(content)
    user_error(merge(base, experts, tmp_path / "out"), f"error: {experts[1] / 'config.json'}: ")
