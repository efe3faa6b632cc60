"""The sandbox: a whole podwire cluster on one machine, and the test bed the tests stand on."""
