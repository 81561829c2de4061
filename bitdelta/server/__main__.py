from bitdelta.server.cli import main

main()
