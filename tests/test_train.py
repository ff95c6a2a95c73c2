"""gpt-train and gpt-sample: a tiny run lowers the loss, checkpoints round-trip, resume continues exactly (also
after Ctrl-C, across precisions, and with a GPU run's optimizer options), checkpoint writes are atomic, --compile
trains and resumes, the log reports tokens/s and MFU over training steps only, the sample CLI prints text, Triton
falls back to eager without a GPU, and bad input is one line."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import DEVICE

import gpt.train
from gpt import throughput
from gpt.checkpoint import CHECKPOINT_KEYS, load_checkpoint, save_checkpoint
from gpt.data import CharTokenizer
from gpt.model import GPT, GPTConfig
from gpt.sample import main as sample_main
from gpt.step import TrainStep
from gpt.train import PRESETS, InputError, parse_args, train

REPO = Path(__file__).resolve().parents[1]
TEXT = "the quick brown fox jumps over the lazy dog.\nthe five boxing wizards jump quickly!\n" * 40
TINY = ["--n-embd", "16", "--n-head", "2", "--n-layer", "1", "--block-size", "16", "--dropout", "0",
        "--batch-size", "16", "--lr", "1e-2", "--eval-iters", "4", "--sample-tokens", "30"]  # fmt: skip


def tiny_run(data, out_dir, device, *extra):
    return train(parse_args(["--data", str(data), "--out-dir", str(out_dir), "--device", device, *TINY, *extra]))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "input.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(data_file, tmp_path_factory):
    """One tiny training run shared by the tests that only read its results."""
    out_dir = tmp_path_factory.mktemp("out")
    return tiny_run(data_file, out_dir, DEVICE, "--max-iters", "60", "--eval-interval", "30")


def test_tiny_training_run_lowers_the_loss_and_prints_a_sample(trained):
    steps = [step for step, _ in trained["history"]]
    assert steps == [0, 30, 60]
    first, last = trained["history"][0][1], trained["history"][-1][1]
    assert last["train"] < first["train"] - 1.0 and last["val"] < first["val"] - 1.0
    assert len(trained["sample"]) == 1 + 30  # the newline prompt and 30 new characters


def test_checkpoint_round_trip(trained, data_file):
    checkpoint = load_checkpoint(trained["checkpoint"], DEVICE)
    assert checkpoint["step"] == 60
    assert checkpoint["vocab"] == sorted(set(TEXT))
    assert checkpoint["args"]["data"] == str(data_file)
    assert set(checkpoint["losses"]) == {"train", "val"}
    model = GPT(GPTConfig(**checkpoint["config"])).to(DEVICE).eval()
    model.load_state_dict(checkpoint["model"])
    original = trained["model"].eval()
    idx = torch.tensor([CharTokenizer(checkpoint["vocab"]).encode("the lazy dog")], device=DEVICE)
    torch.testing.assert_close(model(idx)[0], original(idx)[0], rtol=0, atol=0)
    assert checkpoint["optimizer"]["state"], "the optimizer state is saved for --resume"


def test_resume_continues_where_the_run_stopped(data_file, tmp_path, device):
    straight = tiny_run(data_file, tmp_path / "straight", device, "--max-iters", "20", "--eval-interval", "10")
    tiny_run(data_file, tmp_path / "split", device, "--max-iters", "10", "--eval-interval", "10")
    resumed = train(parse_args(["--out-dir", str(tmp_path / "split"), "--device", device, *TINY,  # no --data:
                                "--max-iters", "20", "--eval-interval", "10", "--resume"]))  # the checkpoint's text
    assert [step for step, _ in resumed["history"]] == [10, 20]
    checkpoint = load_checkpoint(tmp_path / "split" / "ckpt.pt")
    assert checkpoint["step"] == 20 and checkpoint["args"]["data"] == str(data_file)
    # The same batches in the same order with the same optimizer state: the same weights (bit for bit on CPU;
    # the tolerance leaves room for a GPU reduction that sums in a different order).
    for (name, a), b in zip(straight["model"].state_dict().items(), resumed["model"].state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


def test_ctrl_c_stops_at_a_step_says_where_the_checkpoint_is_and_resume_stays_exact(data_file, tmp_path):
    out_dir = tmp_path / "interrupted"
    command = [sys.executable, "-m", "gpt.train", "--data", str(data_file), "--out-dir", str(out_dir),
               "--device", "cpu", *TINY, "--max-iters", "1000000", "--eval-interval", "5"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 120
    while not (out_dir / "ckpt.pt").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr, stderr
    said = re.search(r"^interrupted at step (\d+); the last checkpoint \(step (\d+)\) is in (.+); "
                     r"continue with --resume$", stderr, re.MULTILINE)  # fmt: skip
    assert said, stderr
    stopped_at, saved_at, path = int(said[1]), int(said[2]), Path(said[3])
    assert path == out_dir / "ckpt.pt" and load_checkpoint(path)["step"] == saved_at
    assert saved_at > 0 and saved_at % 5 == 0 and saved_at <= stopped_at

    # Resuming goes on exactly as a run that was never interrupted.
    target = ["--max-iters", str(saved_at + 3), "--eval-interval", "5"]
    straight = tiny_run(data_file, tmp_path / "straight", "cpu", *target)
    resumed = train(parse_args(["--out-dir", str(out_dir), "--device", "cpu", *TINY, *target, "--resume"]))
    for (name, a), b in zip(straight["model"].state_dict().items(), resumed["model"].state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


def test_resume_without_a_checkpoint_is_a_clear_error(data_file, tmp_path, device):
    with pytest.raises(InputError, match="no checkpoint at"):
        tiny_run(data_file, tmp_path, device, "--resume")


def checkpoint_like(step, weights):
    return {**dict.fromkeys(CHECKPOINT_KEYS), "step": step, "model": {"weights": weights}}


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(checkpoint_like(1, torch.arange(5.0)), path)
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left behind

    real_save = torch.save

    def save_then_crash(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.write(b"half of a second checkpoint")
        raise KeyboardInterrupt("interrupted while writing")

    monkeypatch.setattr(torch, "save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(checkpoint_like(2, torch.zeros(5)), path)
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    survivor = load_checkpoint(path)
    assert survivor["step"] == 1 and torch.equal(survivor["model"]["weights"], torch.arange(5.0))


def test_triton_falls_back_to_eager_on_cpu(data_file, tmp_path, capsys):
    result = tiny_run(data_file, tmp_path, "cpu", "--attention", "triton", "--layernorm", "triton",
                      "--max-iters", "1", "--eval-iters", "1")  # fmt: skip
    out = capsys.readouterr().out
    assert "Triton backends need a CUDA GPU" in out
    assert "attention=eager, layernorm=eager" in out
    assert result["model"].config.attention == result["model"].config.layernorm == "eager"


def test_training_logs_and_progress_bar(data_file, tmp_path, capsys):
    tiny_run(data_file, tmp_path, "cpu", "--max-iters", "3", "--eval-interval", "3", "--eval-iters", "1")
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].startswith("device: cpu (CPU, ")
    assert lines[1:6] == [
        "backends: attention=eager, layernorm=eager (the reference modules, the default on a CPU, where Triton runs "
        "only interpreted)",
        "precision: float32 (the default on a CPU)",
        "optimizer: AdamW, not fused; TF32 matmuls off (fused AdamW and TF32 are used on CUDA only)",
        "step: compile off, CUDA graphs off (the default on a CPU)",
        "speed: tokens/s (MFU is reported on a GPU only)",
    ]
    assert re.search(r"^step 3: train loss [\d.]+, val loss [\d.]+; [\d,]+ tokens/s$", captured.out, re.MULTILINE)
    assert re.search(r"^speed: [\d,]+ tokens/s, over the 2 timed steps", captured.out, re.MULTILINE)
    assert "---- sample ----" in captured.out
    assert re.search(r"\r3/3 \[#+\] loss [\d.]+, [\d,]+ tokens/s", captured.err)


class FakeClock:
    """time.perf_counter's stand-in: the time moves only when a test moves it."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_log_reports_tokens_per_s_and_mfu_of_training_steps_only(data_file, tmp_path, monkeypatch, capsys):
    """With a stand-in clock: the warm-up step takes 100 s, each evaluation 1000 s, every other step a time chosen
    to be 25% of an H100's peak (the card's name stubbed). The log's tokens/s and MFU are those steps' alone, in the
    periodic lines (the rolling window) and in the final summary."""
    clock = FakeClock()
    monkeypatch.setattr(time, "perf_counter", clock)
    monkeypatch.setattr(throughput, "card_name", lambda device: "NVIDIA H100 80GB HBM3")
    model = GPT(GPTConfig(vocab_size=len(set(TEXT)), n_embd=16, n_head=2, n_layer=1, block_size=16))
    tokens_per_step = 16 * 16
    step_s = tokens_per_step * throughput.flops_per_token(model) / (0.25 * 989e12)
    real_step, real_evaluation = TrainStep.__call__, gpt.train.estimate_loss

    def timed_step(self, x, y):
        loss = real_step(self, x, y)
        clock.now += 100.0 if self.warming_up else step_s
        return loss

    def timed_evaluation(*args, **kwargs):
        clock.now += 1000.0
        return real_evaluation(*args, **kwargs)

    monkeypatch.setattr(TrainStep, "__call__", timed_step)
    monkeypatch.setattr(gpt.train, "estimate_loss", timed_evaluation)
    tiny_run(data_file, tmp_path, "cpu", "--max-iters", "6", "--eval-interval", "3", "--eval-iters", "1")
    out = capsys.readouterr().out
    assert "speed: tokens/s and MFU" in out and "against the NVIDIA H100 80GB HBM3's peak bf16 rate, 989 TFLOP/s" in out
    reported = re.findall(r"^(step 3|step 6|speed): .*?([\d,]+) tokens/s, MFU ([\d.]+)%", out, re.MULTILINE)
    assert [where for where, _, _ in reported] == ["step 3", "step 6", "speed"], out
    for _, rate, mfu in reported:
        assert float(rate.replace(",", "")) == pytest.approx(tokens_per_step / step_s, rel=1e-3)  # the clock's ulp
        assert mfu == "25.0"
    assert "over the 5 timed steps" in out


def test_checkpoints_move_between_precisions(data_file, tmp_path):
    """Written under bf16 autocast, a checkpoint holds float32 weights and AdamW state: it loads into an fp32 model
    and gives the trained model's logits, and it resumes in fp32; one written in fp32 resumes under bf16; and a bf16
    run resumed in bf16 is the run never interrupted."""
    schedule = ["--eval-interval", "10", "--eval-iters", "2"]

    def run(out_dir, dtype, max_iters, *extra):
        return tiny_run(data_file, tmp_path / out_dir, "cpu", "--dtype", dtype, "--max-iters", str(max_iters),
                        *schedule, *extra)  # fmt: skip

    written = run("bf16", "bfloat16", 10)
    checkpoint = load_checkpoint(written["checkpoint"])
    assert checkpoint["args"]["dtype"] == "bfloat16"
    moments = [t for state in checkpoint["optimizer"]["state"].values() for t in state.values()]
    assert {t.dtype for t in [*checkpoint["model"].values(), *moments] if t.is_floating_point()} == {torch.float32}
    fp32_model = GPT(GPTConfig(**checkpoint["config"])).eval()
    fp32_model.load_state_dict(checkpoint["model"])
    idx = torch.tensor([CharTokenizer(checkpoint["vocab"]).encode("the lazy dog")])
    torch.testing.assert_close(fp32_model(idx)[0], written["model"].eval()(idx)[0], rtol=0, atol=0)

    shutil.copytree(tmp_path / "bf16", tmp_path / "bf16-then-fp32")
    run("fp32", "float32", 10)
    straight = run("bf16-straight", "bfloat16", 20)
    for out_dir, dtype in [("bf16-then-fp32", "float32"), ("fp32", "bfloat16"), ("bf16", "bfloat16")]:
        resumed = run(out_dir, dtype, 20, "--resume")
        (_, at_10), (_, at_20) = resumed["history"]
        assert at_20["val"] < at_10["val"], (out_dir, resumed["history"])
    for (name, a), b in zip(straight["model"].state_dict().items(), resumed["model"].state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


def test_resume_takes_this_runs_optimizer_options(data_file, tmp_path):
    """A checkpoint holds AdamW's options where it was written: fused on a GPU, capturable under CUDA graphs.
    Resumed on a CPU, the run takes its own options, keeps the moments and step counts, and goes on exactly."""
    target = ["--max-iters", "20", "--eval-interval", "10", "--eval-iters", "2"]
    straight = tiny_run(data_file, tmp_path / "straight", "cpu", *target)
    written = tiny_run(data_file, tmp_path / "gpu", "cpu", "--max-iters", "10", "--eval-interval", "10")
    checkpoint = load_checkpoint(written["checkpoint"])
    for group in checkpoint["optimizer"]["param_groups"]:
        group.update(fused=True, capturable=True)  # as a CUDA-graph run on a GPU saves them
    save_checkpoint(checkpoint, written["checkpoint"])
    resumed = train(parse_args(["--out-dir", str(tmp_path / "gpu"), "--device", "cpu", *TINY, *target, "--resume"]))
    for (name, a), b in zip(straight["model"].state_dict().items(), resumed["model"].state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    for group in load_checkpoint(resumed["checkpoint"])["optimizer"]["param_groups"]:
        assert not group["fused"] and not group["capturable"]  # what this run used (and now saved)


def test_compile_trains_and_resumes(data_file, tmp_path, capsys):
    """--compile on CPU (Inductor; eager backends there): a run stopped and resumed under compile ends where the
    eager run ends, up to the rounding of fused arithmetic."""
    target = ["--max-iters", "6", "--eval-interval", "3", "--eval-iters", "2"]
    torch._dynamo.reset()
    try:
        eager = tiny_run(data_file, tmp_path / "eager", "cpu", *target)
        tiny_run(data_file, tmp_path / "compiled", "cpu", "--compile", "--max-iters", "3", "--eval-interval", "3")
        resumed = train(parse_args(["--out-dir", str(tmp_path / "compiled"), "--device", "cpu", *TINY, *target,
                                    "--compile", "--resume"]))  # fmt: skip
    finally:
        torch._dynamo.reset()
    assert "step: compile on (as requested), CUDA graphs off (the default on a CPU)" in capsys.readouterr().out
    for (name, a), b in zip(eager["model"].state_dict().items(), resumed["model"].state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)


def test_presets_and_explicit_flags():
    args = parse_args(["--preset", "reference"])
    assert {k: getattr(args, k) for k in PRESETS["reference"]} == PRESETS["reference"]
    assert (args.n_embd, args.n_head, args.n_layer, args.block_size, args.batch_size) == (384, 6, 6, 256, 64)
    assert (args.dropout, args.lr, args.max_iters) == (0.2, 3e-4, 5000)
    args = parse_args(["--preset", "reference", "--lr", "1e-3", "--n-layer", "2"])
    assert args.lr == 1e-3 and args.n_layer == 2 and args.n_embd == 384
    assert parse_args([]).preset == ("reference" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("argv", [["--max-iters", "-1"], ["--batch-size", "0"], ["--attention", "flash"]])
def test_bad_training_flags(argv, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert "error" in capsys.readouterr().err


def test_sample_cli_prints_text(trained):
    out_dir = trained["checkpoint"].parent
    command = [sys.executable, "-m", "gpt.sample", "--out-dir", str(out_dir), "--prompt", "the ",
               "--max-new-tokens", "40", "--temperature", "0.8", "--top-k", "5", "--seed", "1"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    text = result.stdout.rstrip("\n")
    assert text.startswith("the ") and len(text) == 4 + 40
    assert set(text) <= set(TEXT)
    assert re.fullmatch(r"40 tokens in [\d.]+ s \([\d.]+ tokens/s, with a key/value cache\)\n", result.stderr)
    recomputed = subprocess.run(command + ["--no-cache"], capture_output=True, text=True, cwd=REPO, env=env,
                                timeout=120)
    assert recomputed.stdout == result.stdout and "recomputing the context" in recomputed.stderr


def test_sample_is_reproducible_with_a_seed(trained, capsys):
    argv = ["--checkpoint", str(trained["checkpoint"]), "--max-new-tokens", "25", "--seed", "7"]
    sample_main(argv)
    first = capsys.readouterr().out
    sample_main(argv)
    assert capsys.readouterr().out == first and len(first) == 1 + 25 + 1  # prompt, text, print's newline


# Bad input to either command: (command, arguments, what its one-line error must say). In the arguments {files}
# is a scratch folder holding empty.txt, truncated.pt (the first 2000 bytes of a checkpoint) and damaged/ckpt.pt
# (the same), {data} the training text, {checkpoint} a good checkpoint and {readme} the README.
BAD_INPUT = {
    "missing-data": ("gpt.train", "--data {files}/missing.txt", "missing.txt does not exist"),
    "empty-data": ("gpt.train", "--data {files}/empty.txt", "empty.txt is empty"),
    "binary-data": ("gpt.train", "--data {checkpoint}", "ckpt.pt is not UTF-8 text"),
    "no-cuda": ("gpt.train", "--data {data} --device cuda", "--device cuda requested but CUDA is not available"),
    "tpu": ("gpt.train", "--data {data} --device tpu", "--device must be cpu, cuda or cuda:N, got 'tpu'"),
    "heads": ("gpt.train", "--data {data} --n-embd 18 --n-head 4", "n_embd (18) must be divisible by n_head (4)"),
    "negative-lr": ("gpt.train", "--data {data} --lr -1", "--lr must be positive, got -1.0"),
    "zero-iters": ("gpt.train", "--data {data} --max-iters 0", "--max-iters must be positive, got 0"),
    "negative-iters": ("gpt.train", "--data {data} --max-iters -5", "--max-iters must be positive, got -5"),
    "resume-nothing": ("gpt.train", "--data {data} --resume --out-dir {files}/none", "no checkpoint at"),
    "resume-damaged": ("gpt.train", "--data {data} --resume --out-dir {files}/damaged", "is a damaged checkpoint"),
    "readme-checkpoint": ("gpt.sample", "--checkpoint {readme}", "README.md is not a checkpoint"),
    "truncated-checkpoint": ("gpt.sample", "--checkpoint {files}/truncated.pt", "truncated.pt is a damaged checkpoint"),
    "sample-tpu": ("gpt.sample", "--device tpu", "--device must be cpu, cuda or cuda:N, got 'tpu'"),
    "no-threads": ("gpt.train", "--data {data} --threads 0", "--threads must be positive, got 0"),
    "sample-no-threads": ("gpt.sample", "--threads 0", "--threads must be positive, got 0"),
    "cuda-graphs-on-cpu": ("gpt.train", "--data {data} --device cpu --cuda-graphs", "--cuda-graphs needs a CUDA GPU"),
}


@pytest.fixture(scope="module")
def bad_input_runs(trained, data_file, tmp_path_factory):
    """Every BAD_INPUT case run as its own command, all started at once (each spends most of its time importing
    torch); returns case -> (stderr, exit status)."""
    files = tmp_path_factory.mktemp("bad_input")
    (files / "empty.txt").write_text("")
    truncated = trained["checkpoint"].read_bytes()[:2000]
    (files / "truncated.pt").write_bytes(truncated)
    (files / "damaged").mkdir()
    (files / "damaged" / "ckpt.pt").write_bytes(truncated)
    paths = dict(files=files, data=data_file, checkpoint=trained["checkpoint"], readme=REPO / "README.md")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started = {}
    for case, (module, arguments, _) in BAD_INPUT.items():
        if case == "no-cuda" and torch.cuda.is_available():
            continue  # it would train
        command = [sys.executable, "-m", module, *arguments.format(**paths).split()]
        started[case] = subprocess.Popen(command, cwd=files, env=env, text=True, stderr=subprocess.PIPE)
    return {case: (process.communicate(timeout=300)[1], process.returncode) for case, process in started.items()}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_one_line_and_exit_status_2(bad_input_runs, case):
    if case not in bad_input_runs:
        pytest.skip("this machine has CUDA")
    stderr, returncode = bad_input_runs[case]
    module, _, message = BAD_INPUT[case]
    command = module.replace("gpt.", "gpt-")
    assert returncode == 2, stderr
    assert stderr.startswith(f"{command}: error: ") and stderr.count("\n") == 1, stderr
    assert message in stderr, stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--prompt", "the Zebra"], "not in the vocabulary: 'Z'"),
        (["--temperature", "0"], "--temperature must be positive"),
        (["--top-k", "0"], "--top-k must be at least 1"),
        (["--checkpoint", "missing/ckpt.pt"], "no checkpoint at"),
    ],
)
def test_sample_bad_input_is_a_clear_error(trained, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sample_main(["--out-dir", str(trained["checkpoint"].parent), *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cpu_threads_default_to_one_and_follow_the_flag(data_file, tmp_path):
    """One thread unless --threads (or OMP_NUM_THREADS) says otherwise: see gpt/cli.py for why."""
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = str(REPO)
    runs = {}
    for threads in (None, 3):
        flag = [] if threads is None else ["--threads", str(threads)]
        out_dir = tmp_path / str(threads)
        command = [sys.executable, "-m", "gpt.train", "--data", str(data_file), "--out-dir", str(out_dir),
                   "--device", "cpu", *TINY, "--max-iters", "1", "--eval-iters", "1", *flag]  # fmt: skip
        runs[threads] = subprocess.Popen(command, cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE)
    outputs = {threads: run.communicate(timeout=300)[0] for threads, run in runs.items()}
    assert "device: cpu (CPU, 1 thread)" in outputs[None], outputs[None]
    assert "device: cpu (CPU, 3 threads)" in outputs[3], outputs[3]


def test_sampling_does_not_load_the_training_script():
    check = "import sys, gpt.sample; assert 'gpt.train' not in sys.modules, sorted(sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr
