from unpersonal.cli import main

main()
