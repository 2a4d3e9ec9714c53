from amqplex.cli import main

main()
