from ._handoff import main

main()
