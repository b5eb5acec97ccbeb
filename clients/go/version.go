package marie

// Version of this client: clients/VERSION, whose major is the contracts'
// package version (marie.*.v1). `make clients-check` keeps them equal.
const Version = "1.0.0"
