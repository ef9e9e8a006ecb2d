"""Coordination between regions: leader lease and epoch in etcd, health, fencing, takeover."""
