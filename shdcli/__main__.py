from shdcli.cli import main

main()
