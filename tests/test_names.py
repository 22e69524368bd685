"""lowmem_merge.names on the tensor names transformers really writes: tiny models of seven architectures built from
a config, their state_dict names checked against the model's own structure (its layer list, its input and output
embeddings, the order it stores tensors in)."""
from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch

from lowmem_merge import names
from lowmem_merge.info import TensorClass
from lowmem_merge.io.checkpoint import open_checkpoint
from lowmem_merge.plan import EXPERT_IS_BASE, make_plan

transformers = pytest.importorskip("transformers")

SMALL = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, vocab_size=48, max_position_embeddings=32)
# architecture: (model class, config, the layer stacks as module paths)
ARCHS = {
    "llama": ("LlamaForCausalLM", transformers.LlamaConfig(**SMALL, num_hidden_layers=3, num_key_value_heads=1),
              ["model.layers"]),
    "qwen2": ("Qwen2ForCausalLM", transformers.Qwen2Config(**SMALL, num_hidden_layers=3, num_key_value_heads=1),
              ["model.layers"]),
    "phi3": ("Phi3ForCausalLM", transformers.Phi3Config(**SMALL, num_hidden_layers=3, num_key_value_heads=1,
                                                        pad_token_id=0), ["model.layers"]),
    "gpt_neox": ("GPTNeoXForCausalLM", transformers.GPTNeoXConfig(**SMALL, num_hidden_layers=3), ["gpt_neox.layers"]),
    "gpt2": ("GPT2LMHeadModel", transformers.GPT2Config(n_embd=16, n_layer=3, n_head=2, vocab_size=48, n_positions=32),
             ["transformer.h"]),
    "bert": ("BertForSequenceClassification", transformers.BertConfig(**SMALL, num_hidden_layers=3, num_labels=3),
             ["bert.encoder.layer"]),
    "t5": ("T5ForConditionalGeneration", transformers.T5Config(d_model=16, d_ff=32, d_kv=8, num_heads=2, num_layers=4,
                                                               vocab_size=48), ["encoder.block", "decoder.block"]),
}


@pytest.fixture(scope="module", params=sorted(ARCHS))
def arch(request):
    cls_name, config, stacks = ARCHS[request.param]
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(config).eval()
    return request.param, model, stacks


def test_layer_index_is_the_position_in_the_models_layer_list(arch):
    _, model, stacks = arch
    state = model.state_dict()
    want: dict[str, tuple[str, int]] = {}
    for stack in stacks:
        blocks = model.get_submodule(stack)
        assert isinstance(blocks, torch.nn.ModuleList) and len(blocks) >= 3
        for i, block in enumerate(blocks):
            for n in block.state_dict():
                want[f"{stack}.{i}.{n}"] = (stack, i)
    assert want and set(want) <= set(state)
    for name in state:
        split = names.split_layer(name)
        if name in want:
            stack, i = want[name]
            assert split == (stack, i, name[len(f"{stack}.{i}."):]), name
            assert names.layer_of(name) == i and names.block_of(name) == f"{stack}.{i}"
        else:
            assert split is None and names.layer_of(name) is None, name
            assert names.block_of(name) == name.rsplit(".", 1)[0]


def _weight_name(model, module) -> str | None:
    if module is None:
        return None
    return next(f"{m}.weight" for m, sub in model.named_modules() if sub is module)


def test_token_embedding_and_lm_head_are_the_models_input_and_output_embeddings(arch):
    _, model, _ = arch
    state = model.state_dict()
    inp = model.get_input_embeddings().weight
    lm_head = _weight_name(model, model.get_output_embeddings())
    # tied copies (t5's encoder/decoder embed_tokens) share the input embedding's storage
    token = {n for n, t in state.items() if t.data_ptr() == inp.data_ptr() and t.shape == inp.shape} - {lm_head}
    assert {n for n in state if names.is_token_embedding(n)} == token
    assert {n for n in state if names.is_lm_head(n)} == ({lm_head} if lm_head else set())
    assert {n for n in state if names.is_vocab_tensor(n)} == token | ({lm_head} if lm_head else set())
    assert all(names.is_embedding(n) for n in token)


def test_before_the_layers_means_stored_before_them(arch):
    """Single-stack models store embeddings, then the layers, then the final norm, pooler and heads: what comes
    before the first layer tensor is the input side (mergekit's first slice), what follows the last is not."""
    kind, model, stacks = arch
    if len(stacks) > 1:
        pytest.skip("encoder-decoder: two stacks, no single before/after")
    order = list(model.state_dict())
    inside = [i for i, n in enumerate(order) if names.layer_of(n) is not None]
    before, after = order[:inside[0]], order[inside[-1] + 1:]
    assert before and after
    assert all(names.is_input_embedding(n) for n in before), before
    assert not any(names.is_input_embedding(n) for n in after), after
    assert not any(names.is_input_embedding(n) for n in order[inside[0]:inside[-1] + 1])


def test_task_heads_are_the_classifier_only(arch):
    kind, model, _ = arch
    heads = {n for n in model.state_dict() if names.is_task_head(n)}
    assert heads == ({"classifier.weight", "classifier.bias"} if kind == "bert" else set())


def test_gpt2_conv1d_weights_are_recognized():
    model = transformers.GPT2LMHeadModel(ARCHS["gpt2"][1])
    conv = {n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"}
    assert {n for n in model.state_dict() if names.is_conv1d(n)} == {f"{n}.weight" for n in conv}


def test_plan_sets_each_tensors_layer_once(tmp_path):
    cls_name, config, stacks = ARCHS["gpt2"]
    model = getattr(transformers, cls_name)(config)
    model.save_pretrained(tmp_path / "base")
    with open_checkpoint(tmp_path / "base") as base, open_checkpoint(tmp_path / "base") as same:
        plan = make_plan(base, [same])
        for info in plan.tensors:
            assert info.layer == names.layer_of(info.name)
        assert sorted({i.layer for i in plan.tensors} - {None}) == [0, 1, 2]
        by_name = {i.name: i for i in plan.tensors}
        assert by_name["transformer.wte.weight"].cls == TensorClass.EMB
        assert by_name["transformer.h.1.attn.c_attn.weight"].transposed
        # a warning is a record; its text is what the report has always said
        (w,) = plan.warnings
        assert w.kind == EXPERT_IS_BASE and w.fields["expert"] == 0
        assert w == f"expert 0 ({same.path}) reads the same files as the base: its task vector is zero"
        assert json.dumps(plan.warnings) == json.dumps([w.message])
        for copied in (pickle.loads(pickle.dumps(w)), copy.deepcopy(w)):
            assert (copied, copied.kind, copied.fields) == (w, w.kind, w.fields)
