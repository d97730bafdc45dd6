def main() -> None:
    print("refvision: CLI not built yet")
