"""`python -m lens_jax.budget estimate`: the lens_paper schedule with configs/lens_3p8b.py against a hand
calculation written out here (independent arithmetic from the config's sizes, not a call back into
lens_jax.budget.flops), hours and cost, --measured-mfu-from, schedule errors naming file and field, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from lens_jax.budget.__main__ import main
from lens_jax.budget.estimate import estimate
from lens_jax.budget.schedule import ScheduleError, aspect_buckets, load_schedule

CONFIG = str(REPO / "configs" / "lens_3p8b.py")
SCHEDULE = str(REPO / "configs" / "schedules" / "lens_paper.py")

# ---- configs/lens_3p8b.py, written out ------------------------------------------------------------
D = 24 * 64  # inner dim 1536
L = 48  # double-stream blocks
M = int(1536 * 8 / 3)  # SwiGLU hidden 4096
C_IN = C_OUT = 128  # packed FLUX.2 latent channels, proj_out width
ENC = 4 * 2880  # 4 selected GPT-OSS layers x 2880 -> txt_in
T_EMB = 256  # timestep sinusoid

# Matmul weights a token of each stream touches (per block: fused qkv 3d^2, out d^2, SwiGLU 3dm).
P_IMG = L * (3 * D * D + D * D + 3 * D * M) + C_IN * D + D * C_OUT  # + img_in, proj_out
P_TXT = L * (3 * D * D + D * D + 3 * D * M) + ENC * D  # + txt_in
# Once per sample: timestep MLP, 2 x (d -> 6d) modulation per block, final adaLN d -> 2d.
P_SAMPLE = T_EMB * D + D * D + L * 2 * D * 6 * D + D * 2 * D


def dit_train(t_img: int, t_txt: int) -> float:
    """SPEC section 7: 6 * (P_img T_img + P_txt T_txt + P_sample) + 12 L d (T_img + T_txt)^2."""
    return 6.0 * (P_IMG * t_img + P_TXT * t_txt + P_SAMPLE) + 12.0 * L * D * (t_img + t_txt) ** 2


# GPT-OSS-20B, all 24 layers run (last selected layer is 23), no lm_head, top-4 of 32 experts.
G_LAYERS, G_D, G_Q, G_KV, G_I, G_E, G_K = 24, 2880, 64 * 64, 8 * 64, 2880, 32, 4
G_PER_TOKEN = G_D * G_Q + 2 * G_D * G_KV + G_Q * G_D + G_D * G_E + G_K * (G_D * 2 * G_I + G_I * G_D)


def text_forward(t: int) -> float:
    """2 x active weights x tokens + dense (masked) attention 4 T^2 (heads x head_dim) per layer."""
    return G_LAYERS * (2.0 * G_PER_TOKEN * t + 4.0 * t * t * G_Q)


def conv(k, cin, cout, h, w):
    return 2.0 * k * k * cin * cout * h * w


def vae_encode(h: int, w: int) -> float:
    """FLUX.2 VAE encoder: channels 128, 256, 512, 512, 2 resnets per level, 3 downsamplers,
    mid resnet-attention-resnet at 512, conv_out to 2 x 32, 1x1 quant_conv."""
    f = conv(3, 3, 128, h, w)
    f += 4 * conv(3, 128, 128, h, w)  # level 0: 2 resnets x 2 convs
    h, w = h // 2, w // 2
    f += conv(3, 128, 128, h, w)  # downsampler 0 (output size)
    f += conv(3, 128, 256, h, w) + conv(3, 256, 256, h, w) + conv(1, 128, 256, h, w) + 2 * conv(3, 256, 256, h, w)
    h, w = h // 2, w // 2
    f += conv(3, 256, 256, h, w)
    f += conv(3, 256, 512, h, w) + conv(3, 512, 512, h, w) + conv(1, 256, 512, h, w) + 2 * conv(3, 512, 512, h, w)
    h, w = h // 2, w // 2
    f += conv(3, 512, 512, h, w)
    f += 4 * conv(3, 512, 512, h, w)  # level 3
    n = h * w
    f += 4 * conv(3, 512, 512, h, w)  # mid resnets
    f += 4 * 2.0 * 512 * 512 * n + 4.0 * n * n * 512  # mid attention: q, k, v, out + QK^T and PV
    f += conv(3, 512, 64, h, w) + conv(1, 64, 64, h, w)
    return f


# The schedule's text: 145 caption tokens (109 words x 1.33) + 22 template tokens reach the DiT;
# the encoder also reads the 97-token preamble.
T_TXT, T_ENC = 145 + 22, 97 + 145 + 22


def per_sample(w: int, h: int) -> float:
    return dit_train((w // 16) * (h // 16), T_TXT) + text_forward(T_ENC) + vae_encode(h, w)


STAGE2_BUCKETS = {  # area side -> 9 sizes at 1:2 .. 2:1 (width = side sqrt(r), height = side / sqrt(r), /16)
    512: ["368x720", "384x688", "416x624", "448x592", "512x512", "592x448", "624x416", "688x384", "720x368"],
    768: ["544x1088", "576x1024", "624x944", "672x880", "768x768", "880x672", "944x624", "1024x576", "1088x544"],
    1024: ["720x1456", "768x1360", "832x1248", "880x1184", "1024x1024", "1184x880", "1248x832", "1360x768",
           "1456x720"],
}
PER_GPU = {512: 24, 768: 10, 1024: 6}


def hand_total() -> tuple[float, float]:
    stage1 = 400_000 * 3072 * per_sample(512, 512)
    stage2 = 0.0
    for side, sizes in STAGE2_BUCKETS.items():
        for s in sizes:
            w, h = (int(x) for x in s.split("x"))
            stage2 += 400_000 / 27 * 128 * PER_GPU[side] * per_sample(w, h)
    return stage1, stage2


def test_hand_constants():
    assert (P_IMG, P_TXT, P_SAMPLE) == (1_359_347_712, 1_376_649_216, 1_366_425_600)
    assert dit_train(1024, 167) == 10_994_414_616_576  # ~1.10e13 per 512^2 sample
    assert G_PER_TOKEN == 126_167_040  # x 24 layers: ~3.03B active weights per token


def test_bucket_sizes_match_the_rule():
    for side, sizes in STAGE2_BUCKETS.items():
        assert aspect_buckets(side) == sizes
        for s in sizes:
            w, h = (int(x) for x in s.split("x"))
            assert w % 16 == 0 and h % 16 == 0 and abs(w * h / side**2 - 1) < 0.03


def test_lens_paper_estimate_matches_the_hand_calculation():
    r = estimate(CONFIG, SCHEDULE, "a100", mfu=0.4, price_per_hour=1.5)
    s1, s2 = hand_total()
    assert [s["name"] for s in r["stages"]] == ["stage1_512", "stage2_27buckets"]
    assert r["stages"][0]["flops"]["total"] == pytest.approx(s1, rel=1e-9)
    assert r["stages"][1]["flops"]["total"] == pytest.approx(s2, rel=1e-9)
    assert r["flops"]["total"] == pytest.approx(s1 + s2, rel=1e-9)
    assert r["flops"]["total"] == pytest.approx(3.347e22, rel=1e-3)
    # per-part totals
    samples1, samples2 = 400_000 * 3072, 400_000 * 128 * (24 + 10 + 6) / 3
    assert r["stages"][0]["samples"] == samples1 and r["stages"][1]["samples"] == pytest.approx(samples2)
    assert r["flops"]["text_encoder"] == pytest.approx((samples1 + samples2) * text_forward(T_ENC), rel=1e-9)
    assert r["stages"][0]["flops"]["dit_train"] == pytest.approx(samples1 * dit_train(1024, 167), rel=1e-12)
    assert r["stages"][0]["flops"]["vae_encode"] == pytest.approx(samples1 * vae_encode(512, 512), rel=1e-12)
    assert r["stages"][0]["image_tokens_per_sample"] == 1024
    assert (r["stages"][0]["dit_text_tokens"], r["stages"][0]["encoder_tokens"]) == (167, 264)

    # hours and cost: FLOPs / (MFU x 312e12) / 3600, x price
    hours = (s1 + s2) / (0.4 * 312e12) / 3600
    assert r["mfu_basis"] == "all" and r["device_hours"] == pytest.approx(hours, rel=1e-12)
    assert r["cost"] == pytest.approx(1.5 * hours, rel=1e-12)
    assert r["device_hours_dit_basis"] == pytest.approx(r["flops"]["dit_train"] / (0.4 * 312e12) / 3600, rel=1e-12)
    # what 192K A100-hours imply, with and without the frozen encoder/VAE FLOPs
    assert r["paper"]["implied_mfu_all_flops"] == pytest.approx((s1 + s2) / (192e3 * 3600 * 312e12), rel=1e-9)
    assert r["paper"]["implied_mfu_dit_only"] == pytest.approx(r["flops"]["dit_train"] / (192e3 * 3600 * 312e12))
    # another chip: same FLOPs, hours scale with the peak
    h100 = estimate(CONFIG, SCHEDULE, "h100", mfu=0.4)
    assert h100["device_hours"] == pytest.approx(hours * 312 / 989, rel=1e-12) and h100["cost"] is None


def test_consistent_with_train_sample_flops():
    from lens_jax.budget.estimate import RunModel, sample_flops
    from lens_jax.budget.flops import train_sample_flops
    from lens_jax.config import load_config

    cfg = load_config(CONFIG)
    ours = sample_flops(RunModel.from_run_config(cfg), 768, 1360, 167, 167 + 97)
    theirs = train_sample_flops(cfg, 768, 1360, 167)
    for k in ("dit_train", "text_encoder", "vae_encode", "total"):
        assert ours[k] == pytest.approx(theirs[k], rel=1e-12)


def test_precomputed_and_padding(tmp_path):
    sched = tmp_path / "s.py"
    sched.write_text(
        "def get_schedule():\n"
        "    return {'name': 'p', 'stages': [{'name': 'a', 'steps': 10, 'buckets': '512x512', 'global_batch': 4,\n"
        "            'caption_tokens': 145, 'template_tokens': 22, 'text_pad_to': 512,\n"
        "            'precomputed_text': True, 'precomputed_latents': True}]}\n")
    r = estimate(CONFIG, sched, "a100", mfu=0.5)
    st = r["stages"][0]
    assert (st["dit_text_tokens"], st["encoder_tokens"]) == (512 - 97, 512)  # offset from the run config
    assert st["flops"]["text_encoder"] == 0 and st["flops"]["vae_encode"] == 0
    assert st["flops"]["total"] == pytest.approx(40 * dit_train(1024, 415), rel=1e-12)


def _write_metrics(workdir, mfus):
    workdir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"step": 50 * (i + 1), "loss": 0.5, "mfu": m}) for i, m in enumerate(mfus)]
    (workdir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_measured_mfu_from_metrics(tmp_path, capsys):
    wd = tmp_path / "run"
    _write_metrics(wd, [0.05, 0.30, None, 0.34])  # the first record (compilation) is skipped
    r = estimate(CONFIG, SCHEDULE, "a100", measured_mfu_from=wd)
    assert r["mfu_source"] == "measured" and r["mfu"] == pytest.approx(0.32)
    assert r["measured"]["records"] == 2 and r["measured"]["path"] == str(wd / "metrics.jsonl")
    assert r["mfu_basis"] == "dit"  # the loop's MFU counts DiT FLOPs
    assert r["device_hours"] == pytest.approx(r["flops"]["dit_train"] / (0.32 * 312e12) / 3600, rel=1e-12)
    assert estimate(CONFIG, SCHEDULE, "a100", measured_mfu_from=wd, warmup_records=0)["mfu"] == pytest.approx(0.23)
    with pytest.raises(ValueError, match="not both"):
        estimate(CONFIG, SCHEDULE, "a100", mfu=0.4, measured_mfu_from=wd)

    assert main(["estimate", "--config", CONFIG, "--schedule", SCHEDULE, "--hardware", "a100",
                 "--measured-mfu-from", str(wd)]) == 0
    assert "measured" in capsys.readouterr().out

    cpu = tmp_path / "cpu"
    _write_metrics(cpu, [None, None, None])  # a CPU run logs mfu null
    with pytest.raises(ValueError, match=str(cpu / "metrics.jsonl")):
        estimate(CONFIG, SCHEDULE, "a100", measured_mfu_from=cpu)
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        estimate(CONFIG, SCHEDULE, "a100", measured_mfu_from=tmp_path / "nothing")
    assert main(["estimate", "--config", CONFIG, "--schedule", SCHEDULE, "--hardware", "a100",
                 "--measured-mfu-from", str(cpu)]) == 2
    assert "no non-null 'mfu'" in capsys.readouterr().err


@pytest.mark.parametrize("stage, field", [
    ("{'name': 'a', 'steps': 5, 'buckets': '512x512', 'global_batch': 4, 'caption_tokens': 1, 'per_device_bach': 3}",
     "stages[1].per_device_bach"),
    ("{'name': 'a', 'steps': 5, 'buckets': '512x500', 'global_batch': 4, 'caption_tokens': 1}", "stages[1].buckets[0]"),
    ("{'name': 'a', 'steps': -5, 'buckets': '512x512', 'global_batch': 4, 'caption_tokens': 1}", "stages[1].steps"),
    ("{'name': 'a', 'steps': 5, 'buckets': '512x512', 'caption_tokens': 1}", "stages[1].global_batch"),
    ("{'name': 'a', 'steps': 5, 'buckets': '2048x2048', 'devices': 8, 'per_device_batch': {'512': 2},"
     " 'caption_tokens': 1}", "stages[1].per_device_batch"),
    ("{'name': 'a', 'steps': 5, 'buckets': '512x512,256x256', 'bucket_weights': [1], 'global_batch': 4,"
     " 'caption_tokens': 1}", "stages[1].bucket_weights"),
])
def test_bad_schedule_field_names_file_and_field(tmp_path, capsys, stage, field):
    good = "{'name': 'ok', 'steps': 5, 'buckets': '512x512', 'global_batch': 4, 'caption_tokens': 1}"
    path = tmp_path / "bad_schedule.py"
    path.write_text(f"def get_schedule():\n    return {{'name': 'bad', 'stages': [{good}, {stage}]}}\n")
    with pytest.raises(ScheduleError) as e:
        load_schedule(path)
    assert str(path) in str(e.value) and field in str(e.value)
    assert main(["estimate", "--config", CONFIG, "--schedule", str(path), "--hardware", "a100"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and field in err


def test_cli_subprocess_json_and_text():
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "lens_jax.budget", "estimate", "--config", "configs/lens_3p8b.py",
           "--schedule", "configs/schedules/lens_paper.py", "--hardware", "a100", "--mfu", "0.4"]
    out = subprocess.run(cmd + ["--json"], cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout
    data = json.loads(out)
    s1, s2 = hand_total()
    assert data["flops"]["total"] == pytest.approx(s1 + s2, rel=1e-9)
    assert data["device_hours"] == pytest.approx((s1 + s2) / (0.4 * 312e12) / 3600, rel=1e-9)
    text = subprocess.run(cmd + ["--price-per-hour", "2"], cwd=REPO, env=env, capture_output=True, text=True,
                          check=True).stdout
    for needle in ("stage1_512", "stage2_27buckets", "DiT train", "text encoder fwd", "VAE encode", "A100-hours",
                   "cost at 2 per device-hour", "imply MFU"):
        assert needle in text
