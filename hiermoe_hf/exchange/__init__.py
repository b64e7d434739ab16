"""The token exchange: process groups per stage, the differentiable row exchange, dispatch/combine,
and the local experts' compute."""
