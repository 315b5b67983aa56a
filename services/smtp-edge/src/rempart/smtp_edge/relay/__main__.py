from rempart.smtp_edge.relay.app import main

main()
