from lightning_cs336.cli import main

if __name__ == "__main__":
    main()
