"""The policy service: every decision of SPEC R-DOM, R-LIM, R-REL and R-IPS, over gRPC."""
