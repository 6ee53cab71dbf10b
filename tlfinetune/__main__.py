from tlfinetune.cli import main

main()
