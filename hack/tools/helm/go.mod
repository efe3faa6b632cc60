module podwire.local/tools/helm

go 1.26.8

require helm.sh/helm/v3 v3.19.0
