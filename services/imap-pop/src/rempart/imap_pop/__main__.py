from rempart.imap_pop.app import main

main()
