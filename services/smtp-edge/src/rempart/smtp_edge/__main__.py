from rempart.smtp_edge.server import main

main()
