module podwire.local/tools/wireguard-go

go 1.26.8

require golang.zx2c4.com/wireguard v0.0.0-20260522210424-ecfc5a8d5446
