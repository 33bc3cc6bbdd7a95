from lrft.cli import main

main()
