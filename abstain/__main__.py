from abstain.cli import main

main()
