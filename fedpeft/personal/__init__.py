"""Personal adapters that never leave the device: `strategies` (the methods: none, finetune, fedsa, ditto),
`store` (one folder per user), `summary` (the server's figures over users). Their
training runs on the device (fedpeft.device.personal)."""
