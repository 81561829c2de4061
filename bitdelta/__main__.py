from bitdelta.cli import main

main()
