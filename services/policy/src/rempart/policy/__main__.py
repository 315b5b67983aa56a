from rempart.policy.app import main

main()
