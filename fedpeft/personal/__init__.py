"""Personal adapters that never leave the device: `strategies` (the methods: none, finetune, fedsa, ditto),
`store` (one folder per user). Their training runs on the device (fedpeft.device.personal); the server's
figures over users are fedpeft.federation.personal_summary."""
