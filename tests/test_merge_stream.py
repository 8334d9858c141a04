"""lora-merge's shard-by-shard path writes exactly what the in-memory path writes, and fails cleanly.

The in-memory path (`--verify-logits`: the whole model loaded, merged in place, saved with save_pretrained) is
the reference: every file of the two output folders is compared byte for byte.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import tiny
from helpers import (
    assert_close,
    assert_error,
    base_plus_adapter,
    load,
    logits,
    make_our_adapter,
    make_peft_adapter,
    merge,
)
from lora_cli.merge import merge_adapter
from lora_cli.merge import output as merge_output
from lora_cli.merge import stream as merge_stream
from lora_cli.safetensors_io import SafetensorsFile, write_streaming


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def assert_same_folders(streamed: Path, in_memory: Path) -> None:
    a, b = files_of(streamed), files_of(in_memory)
    assert sorted(a) == sorted(b)
    for name in b:
        if name.endswith(".safetensors"):  # tensor by tensor first, for a readable failure
            left, right = SafetensorsFile(streamed / name), SafetensorsFile(in_memory / name)
            assert left.keys() == right.keys() and left.metadata == right.metadata, name
            for key in right.keys():
                x, y = left.read(key), right.read(key)
                assert x.dtype == y.dtype and torch.equal(x, y), f"{name}: {key} differs"
        assert a[name] == b[name], f"{name} differs"


def merge_both_ways(adapter: Path, tmp_path: Path, *args: str) -> tuple[Path, Path]:
    streamed, in_memory = tmp_path / "streamed", tmp_path / "in_memory"
    result = merge(adapter, streamed, *args)
    assert result.exit_code == 0, result.output
    assert "shard by shard" in result.output
    result = merge(adapter, in_memory, "--verify-logits", *args)
    assert result.exit_code == 0, result.output
    assert "shard by shard" not in result.output and "verify: merged (float32)" in result.output
    return streamed, in_memory


CASES = {
    "llama plain": ("llama", "ours", {}),
    "llama all-linear DoRA": ("llama", "ours", {"use_dora": True, "target_modules": "all-linear"}),
    "gpt2 Conv1D rsLoRA": ("gpt2", "ours", {"use_rslora": True}),
    "tied llama all-linear": ("llama_tied", "ours", {"target_modules": "all-linear"}),
    "qwen2 rank and alpha patterns": ("qwen2", "ours", {"target_modules": "all-linear",
                                                        "rank_pattern": {"q_proj": 2, "down_proj": 6},
                                                        "alpha_pattern": {"v_proj": 3.0}}),
    "gpt2 PEFT DoRA": ("gpt2", "peft", "dora"),
    "llama PEFT plain": ("llama", "peft", "plain"),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype_and_shards", [(), ("--dtype", "bfloat16", "--max-shard-size", "30KB")],
                         ids=["fp32 one file", "bf16 sharded"])
def test_streamed_folder_is_identical_to_the_in_memory_one(tmp_path, case, dtype_and_shards):
    arch, maker, settings = CASES[case]
    base_dir = tiny.save_model(arch, tmp_path / "base")
    if maker == "ours":
        adapter = make_our_adapter(base_dir, tmp_path / "adapter", **settings)
    else:
        adapter, _ = make_peft_adapter(base_dir, tmp_path / "adapter", arch.removesuffix("_tied"), settings)
    streamed, in_memory = merge_both_ways(adapter, tmp_path, *dtype_and_shards)
    assert_same_folders(streamed, in_memory)
    sharded = bool(dtype_and_shards)
    assert (streamed / "model.safetensors.index.json").is_file() == sharded
    # and it is the adapter's model (the in-memory path checked its logits; check the streamed one directly)
    expected = logits(base_plus_adapter(base_dir, adapter))
    assert_close(logits(load(streamed)), expected, 1e-4 if not sharded else 0.2)


def test_streaming_never_loads_the_model(tiny_model_dir, tmp_path, monkeypatch):
    import transformers

    adapter = make_our_adapter(tiny_model_dir("llama"), tmp_path / "adapter", "dora")

    def refuse(*args, **kwargs):
        raise AssertionError("the streamed merge must not load the whole model")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    result = merge_adapter(adapter, tmp_path / "merged")
    assert result.streamed and result.merged_tensors == 4 and result.largest_merge_error < 1e-5


def test_pickle_base_is_merged_in_memory_with_a_note(tmp_path):
    base_dir = tiny.save_model("llama", tmp_path / "base_bin")
    weights = base_dir / "model.safetensors"  # as older checkpoints ship: the same tensors in a pickle
    stored = SafetensorsFile(weights)
    torch.save({key: stored.read(key) for key in stored.keys()}, base_dir / "pytorch_model.bin")
    weights.unlink()
    assert (base_dir / "pytorch_model.bin").is_file() and not (base_dir / "model.safetensors").exists()
    adapter = make_our_adapter(base_dir, tmp_path / "adapter")
    result = merge(adapter, tmp_path / "merged")
    assert result.exit_code == 0, result.output
    assert "note: the base has no safetensors weights (a pickle .bin checkpoint), so the merge runs in memory" \
        in result.output
    assert_close(logits(load(tmp_path / "merged")), logits(base_plus_adapter(base_dir, adapter)), 1e-4)


def test_full_disk_while_writing_exits_2_and_leaves_nothing(tiny_model_dir, tmp_path, monkeypatch):
    adapter = make_our_adapter(tiny_model_dir("llama"), tmp_path / "adapter")
    out = tmp_path / "new" / "merged"
    calls = []

    def full_disk(path, entries, produce, metadata=None):
        calls.append(path)
        Path(path).write_bytes(b"half a shard")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(merge_stream, "write_streaming", full_disk)
    result = merge(adapter, out, "--max-shard-size", "30KB")

    assert calls
    assert_error(result, "Not enough disk space", str(out), "are free", "nothing was written")
    assert float(result.output.split("needs about ")[1].split(" MB")[0]) > 0.05  # the tiny model's 86 kB
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no output, no temp folder, no parent


def test_too_little_free_space_is_refused_before_writing(tiny_model_dir, tmp_path, monkeypatch):
    adapter = make_our_adapter(tiny_model_dir("llama"), tmp_path / "adapter")
    monkeypatch.setattr(merge_output, "free_bytes", lambda path: 1000)
    result = merge(adapter, tmp_path / "merged")
    assert_error(result, "Not enough disk space", "0.00 MB are free")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_streaming_writer_writes_the_bytes_save_file_writes(tmp_path):
    tensors = {
        "b.weight": torch.randn(3, 5).to(torch.bfloat16), "a.weight": torch.randn(7), "scalar": torch.tensor(2.5),
        "ids": torch.arange(6, dtype=torch.int64).reshape(2, 3), "mask": torch.tensor([True, False]),
        "half": torch.randn(4, 2).half(), "empty": torch.zeros(0, 3),
    }
    save_file(tensors, str(tmp_path / "reference.safetensors"), metadata={"format": "pt"})
    entries = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    asked = []
    write_streaming(tmp_path / "streamed.safetensors", entries, lambda k: asked.append(k) or tensors[k],
                    metadata={"format": "pt"})
    assert (tmp_path / "streamed.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()
    assert sorted(asked) == sorted(tensors)  # each produced once
    read = SafetensorsFile(tmp_path / "reference.safetensors")
    for key, tensor in tensors.items():
        assert torch.equal(read.read(key), tensor)
    with pytest.raises(ValueError, match="expected"):
        write_streaming(tmp_path / "bad.safetensors", entries, lambda k: tensors[k].float())


def test_a_base_whose_index_names_the_wrong_shard_still_streams(tmp_path):
    """Each tensor is read from the shard whose header holds it: a hand-edited or stale index that points a tensor
    at another shard (transformers loads such a base fine) does not break the streamed merge."""
    import json

    from transformers import AutoModelForCausalLM

    base_dir = tiny.save_model("llama", tmp_path / "base")
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(base_dir).save_pretrained(sharded, max_shard_size="30KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (sharded / name).write_bytes((base_dir / name).read_bytes())
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    key = "model.layers.0.mlp.down_proj.weight"
    shards = sorted(set(index["weight_map"].values()))
    index["weight_map"][key] = next(f for f in shards if f != index["weight_map"][key])
    index_path.write_text(json.dumps(index))
    adapter = make_our_adapter(base_dir, tmp_path / "adapter", target_modules="all-linear")
    streamed, in_memory = merge_both_ways(adapter, tmp_path, "--base", str(sharded))
    assert_same_folders(streamed, in_memory)


def test_errors_name_the_base_option_and_blame_a_corrupt_base(tiny_model_dir, tmp_path):
    """--base that does not exist is named as --base; a NaN in the base is the base's fault, not the adapter's."""
    adapter = make_our_adapter(tiny_model_dir("llama"), tmp_path / "adapter")
    assert_error(merge(adapter, tmp_path / "m1", "--base", tmp_path / "nowhere"), "--base", "does not exist")
    from transformers import AutoModelForCausalLM

    broken = tmp_path / "broken"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"))
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = float("nan")
    model.save_pretrained(broken)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (broken / name).write_bytes((tiny_model_dir("llama") / name).read_bytes())
    result = merge(adapter, tmp_path / "m2", "--base", broken)
    assert_error(result, "q_proj", "base model's weight", "re-download")
    assert not (tmp_path / "m2").exists()


def test_a_base_with_both_a_single_file_and_an_index_streams_the_file_transformers_loads(tmp_path):
    """transformers loads model.safetensors before model.safetensors.index.json: a folder holding both (a re-save
    beside an older sharded copy) must stream the single file too, not the shards the index names."""
    from transformers import AutoModelForCausalLM

    base_dir = tiny.save_model("llama", tmp_path / "base")
    both = tmp_path / "both"
    AutoModelForCausalLM.from_pretrained(base_dir).save_pretrained(both, max_shard_size="30KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (both / name).write_bytes((base_dir / name).read_bytes())
    stored = SafetensorsFile(base_dir / "model.safetensors")
    save_file({key: (stored.read(key) * 0.5).contiguous() for key in stored.keys()}, both / "model.safetensors",
              metadata={"format": "pt"})
    assert (both / "model.safetensors.index.json").is_file()
    adapter = make_our_adapter(base_dir, tmp_path / "adapter", target_modules="all-linear")
    streamed, in_memory = merge_both_ways(adapter, tmp_path, "--base", str(both))
    assert_same_folders(streamed, in_memory)
    key = "model.embed_tokens.weight"
    assert torch.equal(SafetensorsFile(streamed / "model.safetensors").read(key), stored.read(key) * 0.5)


def test_peft_adapter_on_lm_head_with_its_saved_copy_of_the_head(tmp_path):
    """PEFT's default save_embedding_layers="auto" adds base_model.model.lm_head.base_layer.weight (a full copy of the
    head) when lm_head is targeted: equal to the base's head it is ignored, and both paths merge what PEFT merges; a
    copy that differs (a modified head) is refused by name on both paths."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    from helpers import randomise_lora

    base_dir = tiny.save_model("llama", tmp_path / "base")
    peft_model = get_peft_model(load(base_dir), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"],
                                                          task_type="CAUSAL_LM"))
    randomise_lora(peft_model)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    copy_key = "base_model.model.lm_head.base_layer.weight"
    tensors = load_file(adapter / "adapter_model.safetensors")
    assert copy_key in tensors  # what PEFT writes by default

    streamed, in_memory = merge_both_ways(adapter, tmp_path)
    assert_same_folders(streamed, in_memory)
    assert_close(logits(load(streamed)), logits(peft_model.merge_and_unload().eval()), 1e-4)

    # a copy saved by a bfloat16 model of this float32 base is the base's head rounded: still the base's
    rounded = dict(tensors, **{copy_key: tensors[copy_key].to(torch.bfloat16)})
    save_file(rounded, adapter / "adapter_model.safetensors")
    assert merge(adapter, tmp_path / "from_bf16_copy").exit_code == 0

    tensors[copy_key] = tensors[copy_key] + 0.01
    save_file(tensors, adapter / "adapter_model.safetensors")
    for args in ((), ("--verify-logits",)):
        out = tmp_path / f"modified{len(args)}"
        assert_error(merge(adapter, out, *args), copy_key, "differs from the base's own",
                     "save_embedding_layers=False")
        assert not out.exists()
