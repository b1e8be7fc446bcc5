"""Identity providers: each builds device-flow requests and parses replies; timing lives in the registry."""
