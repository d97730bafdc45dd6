"""Parameters and FLOPs of MobileNetV2 with RefConv on every k x k conv: training form
vs the re-parameterized (deploy) form vs the vanilla model, at 1x3x224x224.

    python benchmarks/profile_mobilenet_v2.py
"""

import torch
import torchvision

from refvision import convert, profile, reparameterize

SHAPE = (1, 3, 224, 224)


def main() -> None:
    torch.manual_seed(0)
    vanilla = torchvision.models.mobilenet_v2(weights=None)
    baseline = profile(vanilla, SHAPE)
    train_form = convert(torchvision.models.mobilenet_v2(weights=None), "refconv", select="kxk")
    train = profile(train_form, SHAPE)
    deploy = profile(reparameterize(train_form), SHAPE)

    rows = [
        ("params_total", "params_total"),
        ("params_trainable", "params_trainable"),
        ("params_training_only", "params_training_only"),
        ("params_frozen", "params_frozen"),
        ("flops (multiply-adds)", "flops"),
    ]
    print(f"MobileNetV2, RefConv on select='kxk', input {SHAPE}")
    print(f"{'':22}{'train form':>15}{'deploy form':>15}{'vanilla':>15}{'train/deploy':>14}")
    for label, field in rows:
        t, d, v = getattr(train, field), getattr(deploy, field), getattr(baseline, field)
        ratio = f"{t / d:.2f}" if d else "-"
        print(f"{label:22}{t:>15,}{d:>15,}{v:>15,}{ratio:>14}")
    print("deploy form == vanilla:", deploy == baseline)


if __name__ == "__main__":
    main()
