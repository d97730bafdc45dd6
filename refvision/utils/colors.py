"""Label colours for class sets without a palette of their own."""


def label_color(label: int) -> tuple[int, int, int]:
    """A fixed, well-spread RGB colour for class ``label`` (torchvision's palette rule)."""
    return tuple(label * m % 255 for m in (2**25 - 1, 2**15 - 1, 2**21 - 1))  # type: ignore[return-value]
