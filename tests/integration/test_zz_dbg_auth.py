import time, datetime
from tests.integration.test_auth import *
def test_dbg(gateway_process, tmp_path):
    path = tmp_path / "keys.yaml"
    make_keys(path, staying={})
    gw = gateway_process(path)
    for i in range(3):
        secret = remember(keys_mod.create_key(path, f"k{i}"))
        wait_for(lambda: probe(gw.url, secret) == 400, 10)
        revoke = WarmCli("keys", "revoke", "--file", str(path), "--id", f"k{i}")
        t0 = time.monotonic(); revoke.run(); t1 = time.monotonic()
        print("revoke written at", datetime.datetime.now().isoformat(), "cli", round(t1 - t0, 3))
        log = []
        while True:
            a = time.monotonic(); c = probe(gw.url, secret); b = time.monotonic()
            log.append((round(a - t1, 3), round(b - a, 3), c))
            if c == 401: break
            time.sleep(0.05)
        print(log[-3:], "n", len(log))
    print(gw.log_text()[-1500:])
