"""``qdistill pack --grid int4_kernel`` and what ``qdistill inspect`` says of it (issue 16)."""

from __future__ import annotations

import torch
from conftest import QDISTILL, run_command
from torch import nn


def test_pack_on_the_kernel_grid_and_inspect_says_where_layers_run(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 40), nn.ReLU(), nn.Linear(40, 10))
    torch.save(model.state_dict(), tmp_path / "model.pt")
    packed = tmp_path / "model.qd"
    done = run_command(
        [
            QDISTILL,
            "pack",
            "model.pt",
            "-o",
            packed,
            "--grid",
            "int4_kernel",
            "--bucket-size",
            "32",
        ],
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    shown = run_command([QDISTILL, "inspect", packed], cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    rows = {line.split()[0]: line for line in shown.stdout.splitlines() if line.strip()}
    assert rows["0.weight"].rstrip().endswith("int4 kernel")  # K = 64: groups of 32
    assert rows["2.weight"].rstrip().endswith("minmax")  # K = 40: the min-max grid
    assert "1 quantized tensors on the int4 kernel grid run on the int4 kernel" in shown.stdout
    bad = run_command(
        [QDISTILL, "pack", "model.pt", "-o", "x.qd", "--grid", "int4_kernel", "--bits", "3"],
        cwd=tmp_path,
    )
    assert bad.returncode == 2 and "--grid int4_kernel needs bits=4" in bad.stderr
