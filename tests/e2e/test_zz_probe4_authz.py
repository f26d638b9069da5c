import httpx
from gateway.auth import KeyStore
from gateway.components import open_database
from tests.conftest import bearer, serving

def test_two(settings, tmp_path):
    own = settings.with_(database_url=f"sqlite:///{tmp_path/'k.db'}", auth_cache_ttl_s=600.0)
    store = KeyStore(open_database(own))
    admin = store.create("root", team="ops", roles=["admin"]).secret
    with serving(own, tmp_path/"a.log") as a, serving(own, tmp_path/"b.log") as b:
        k = store.create("vic", team="research", roles=["analyst"])
        k2 = store.create("vic2", team="research", roles=["analyst"])
        for u in (a, b):
            for s in (k.secret, k2.secret):
                assert httpx.get(u+"/v1/models", headers=bearer(s)).json()["data"]
        r = httpx.post(f"{a}/admin/keys/{k.key.key_id}/revoke", headers=bearer(admin))
        print("revoke via A", r.status_code, r.text[:200])
        print("after revoke", [httpx.get(u+"/v1/models", headers=bearer(k.secret)).status_code for u in (a, b)])
        r = httpx.put(f"{a}/admin/keys/{k2.key.key_id}/roles", headers=bearer(admin), json={"roles": ["viewer"]})
        print("roles via A", r.status_code, r.text[:200])
        print("after roles", [httpx.get(u+"/v1/models", headers=bearer(k2.secret)).json() for u in (a, b)])
        # a bad admin body: what does the error say
        r = httpx.post(f"{a}/admin/keys", headers=bearer(admin), json={"user": "x"*300, "roles": ["analyst"]})
        print("bad create", r.status_code, r.text[:400])
        r = httpx.post(f"{a}/admin/keys", headers=bearer(admin), content=b'{"user": "a", "roles": ["nosuchrole"], "team": "Research"}')
        print("bad create2", r.status_code, r.text[:400])
        r = httpx.post(f"{a}/admin/keys", headers=bearer(admin), json={"user": "vic", "roles": ["analyst"], "team": "Research"})
        print("look-alike", r.status_code, r.text[:400])
        r = httpx.get(f"{a}/admin/keys/../../etc/passwd", headers=bearer(admin))
        print("traversal", r.status_code, r.text[:200])
