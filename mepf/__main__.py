from mepf.cli import main

main()
