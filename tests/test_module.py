"""LanguageModel: the schedule, a real Trainer run that lowers the loss, mismatches, CS336 checkpoint interop."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from lightning_cs336.cs336_format import (
    export_cs336_checkpoint,
    import_cs336_checkpoint,
    load_cs336_checkpoint,
    save_cs336_checkpoint,
)
from lightning_cs336.data import TokenDataModule
from lightning_cs336.model import TransformerLM
from lightning_cs336.module import LanguageModel, cosine_lr

TINY = dict(context_length=32, d_model=32, num_layers=2, num_heads=2, d_ff=64)


def test_cosine_schedule_boundaries() -> None:
    kw = dict(max_lr=1.0, min_lr=0.1, warmup_steps=10, cosine_steps=110)
    assert cosine_lr(0, **kw) == 0.0
    assert cosine_lr(5, **kw) == pytest.approx(0.5)
    assert cosine_lr(10, **kw) == pytest.approx(1.0)  # end of warm-up: max_lr
    assert cosine_lr(60, **kw) == pytest.approx(0.1 + 0.5 * 0.9)  # half-way down the cosine
    assert cosine_lr(110, **kw) == pytest.approx(0.1)  # T_c reached: min_lr
    assert cosine_lr(1000, **kw) == pytest.approx(0.1)  # afterwards: min_lr
    values = [cosine_lr(t, **kw) for t in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))  # monotone decay


def test_scheduler_steps_every_optimizer_step(tmp_path, tiny_data) -> None:
    module = LanguageModel(vocab_size=257, max_lr=1e-2, min_lr=1e-3, warmup_steps=4, cosine_steps=8, **TINY)
    data = TokenDataModule(str(tiny_data), batch_size=4, context_length=32, val_windows=8)
    lrs = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = L.Trainer(
        max_steps=10,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Record()],
        limit_val_batches=0,
        accumulate_grad_batches=2,
    )
    trainer.fit(module, data)
    # With accumulation 2, each lr value is used for two batches: the schedule follows optimizer steps.
    per_step = lrs[::2]
    assert per_step == pytest.approx([cosine_lr(t, 1e-2, 1e-3, 4, 8) for t in range(len(per_step))])


def test_weight_decay_groups() -> None:
    module = LanguageModel(vocab_size=257, **TINY)
    module.trainer = None  # configure_optimizers only needs estimated steps when cosine_steps is None
    module.hparams.cosine_steps = 100
    opt = module.configure_optimizers()["optimizer"]
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    names = {id(p): n for n, p in module.model.named_parameters()}
    assert all(p.ndim == 2 and "token_embeddings" not in names[id(p)] for p in opt.param_groups[0]["params"])
    assert {names[i] for i in decayed} >= {"lm_head.weight", "layers.0.attn.q_proj.weight"}
    assert {names[id(p)] for p in opt.param_groups[1]["params"]} >= {"token_embeddings.weight", "ln_final.weight"}
    assert opt.param_groups[1]["weight_decay"] == 0.0


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data):
    """A real Trainer run on the tiny corpus, with validation before and after, and a checkpoint."""
    tmp = tmp_path_factory.mktemp("trained")
    torch.manual_seed(0)
    module = LanguageModel(vocab_size=257, max_lr=3e-3, min_lr=3e-4, warmup_steps=5, **TINY)
    data = TokenDataModule(str(tiny_data), batch_size=16, context_length=32, val_windows=32)
    trainer = L.Trainer(
        max_steps=60,
        accelerator="cpu",
        logger=False,
        default_root_dir=tmp,
        enable_progress_bar=False,
        enable_model_summary=False,
        val_check_interval=60,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
    )
    before = trainer.validate(module, data, verbose=False)[0]
    trainer.fit(module, data)
    after = trainer.validate(module, data, verbose=False)[0]
    ckpt = tmp / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    return module, before, after, ckpt


def test_training_lowers_validation_loss(trained) -> None:
    module, before, after, _ = trained
    assert before["val/loss"] == pytest.approx(math.log(before["val/ppl"]), rel=1e-4)
    assert after["val/loss"] < before["val/loss"] - 1.0, (before, after)
    assert after["val/ppl"] == pytest.approx(math.exp(after["val/loss"]), rel=1e-4)


def test_checkpoint_embeds_tokenizer_and_generates(trained) -> None:
    module, _, _, ckpt = trained
    loaded = LanguageModel.load_from_checkpoint(ckpt, map_location="cpu")
    assert loaded.tokenizer is not None and loaded.tokenizer.vocab_size == 257
    for a, b in zip(module.state_dict().values(), loaded.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    text = loaded.generate_text("def ", 20, temperature=0.0)
    assert isinstance(text, str) and loaded.encode("def ") == module.encode("def ")
    assert loaded.flops_per_token > 6 * loaded.model.num_parameters(non_embedding=True)


def test_checkpoint_of_other_architecture_is_a_clear_error(trained) -> None:
    _, _, _, ckpt = trained
    with pytest.raises(ValueError, match="different architecture"):
        LanguageModel.load_from_checkpoint(ckpt, map_location="cpu", d_model=64, num_heads=2)


def test_vocab_mismatch_names_both_values(tmp_path, tiny_data) -> None:
    module = LanguageModel(vocab_size=300, **TINY)
    data = TokenDataModule(str(tiny_data), batch_size=4, context_length=32)
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(ValueError, match=r"vocab_size=257.*vocab_size=300"):
        trainer.fit(module, data)


def test_cs336_export_import_round_trip(trained, tmp_path) -> None:
    module, _, _, ckpt = trained
    out = export_cs336_checkpoint(ckpt, tmp_path / "cs336.pt")
    raw = torch.load(out, weights_only=False)
    assert set(raw) == {"model", "optimizer", "iteration"} and raw["iteration"] == 60
    # A CS336-style consumer: a plain TransformerLM and AdamW(model.parameters()) load it positionally.
    plain = TransformerLM(module.config)
    opt = torch.optim.AdamW(plain.parameters())
    assert load_cs336_checkpoint(out, plain, opt) == 60
    for (name, p), q in zip(plain.named_parameters(), module.model.parameters(), strict=True):
        torch.testing.assert_close(p, q)
        # AdamW state follows its parameter (same shape as the parameter it belongs to).
        assert opt.state[p]["exp_avg"].shape == p.shape, name
    back = import_cs336_checkpoint(out, tmp_path / "back.ckpt", num_heads=2, context_length=32)
    reloaded = LanguageModel.load_from_checkpoint(back, map_location="cpu")
    assert reloaded.hparams.d_ff == 64 and reloaded.hparams.num_layers == 2
    for a, b in zip(reloaded.model.state_dict().values(), module.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


def test_import_rejects_non_cs336_files(tmp_path) -> None:
    path = tmp_path / "x.pt"
    torch.save({"weights": 1}, path)
    with pytest.raises(ValueError, match="not a CS336 checkpoint"):
        import_cs336_checkpoint(path, tmp_path / "y.ckpt", num_heads=2, context_length=32)
    save_cs336_checkpoint(TransformerLM(LanguageModel(vocab_size=257, **TINY).config), None, 3, tmp_path / "ok.pt")
    assert import_cs336_checkpoint(tmp_path / "ok.pt", tmp_path / "ok.ckpt", 2, 32).exists()


def test_invalid_schedule_arguments() -> None:
    with pytest.raises(ValueError, match="min_lr"):
        LanguageModel(vocab_size=257, max_lr=1e-4, min_lr=1e-3, **TINY)
    with pytest.raises(ValueError, match="cosine_steps"):
        LanguageModel(vocab_size=257, warmup_steps=10, cosine_steps=5, **TINY)


def test_compiled_model_resumes_from_plain_checkpoint_keys() -> None:
    """Checkpoints store plain names; a model compiled in setup() (keys `model._orig_mod.*`) must load them."""
    kw = dict(vocab_size=257, compile=True, **TINY)
    source = LanguageModel(**kw)
    checkpoint = {"state_dict": source.state_dict()}  # plain names, as on_save_checkpoint writes them
    target = LanguageModel(**kw)
    target.model = torch.compile(target.model)  # what setup("fit") does; compilation itself is lazy
    target.on_load_checkpoint(checkpoint)
    target.load_state_dict(checkpoint["state_dict"])  # strict
    for a, b in zip(source.model.parameters(), target.model.parameters(), strict=True):
        torch.testing.assert_close(a, b)
