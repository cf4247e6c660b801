"""The list/watch loop against a scripted client: relist on 410, back off on 5xx, slow retry on 4xx.
(The same loop against a real kube-apiserver is in test_kube_agent.py.)"""
from __future__ import annotations

import asyncio
import json
import threading

from lb.objects import decode_event, parse
from lb.source.handler import Intake
from lb.source.kube import SERVICES, ApiError, Informer


class ScriptedClient:
    """list() and watch() follow a script; watch calls block until their events are out."""

    def __init__(self, lists, watches):
        self.lists, self.watches = list(lists), list(watches)
        self.calls: list[str] = []
        self.lock = threading.Lock()

    def list(self, res, limit=500):
        with self.lock:
            self.calls.append("list")
            item = self.lists.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    def watch(self, res, rv, timeout_seconds, emit):
        with self.lock:
            self.calls.append(f"watch@{rv}")
            item = self.watches.pop(0) if self.watches else None
        if item is None:
            raise ApiError(0, "end of script")
        if isinstance(item, Exception):
            raise item
        for ev in item:
            emit(decode_event(res.kind, json.dumps(ev).encode()))


def svc(name, rv):
    return {"metadata": {"name": name, "namespace": "ns", "resourceVersion": rv},
            "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}]}}


def listed(items, rv):
    return [parse("Service", o) for o in items], rv


class Recorder:
    """The handler end of an Intake: what reached the tracker."""

    def __init__(self, replaced, events):
        self.replaced, self.events = replaced, events

    def services_listed(self, services):
        self.replaced.append(services)

    def service_changed(self, svc):
        self.events.append(("ADDED", svc.key.name))

    def service_deleted(self, key):
        self.events.append(("DELETED", key.name))


def run(client, stop_after):
    replaced, events, errors = [], [], []

    async def main():
        stop = asyncio.Event()
        inf = Informer(client, SERVICES, Intake(Recorder(replaced, events)), errors.append)

        async def stopper():
            while len(client.calls) < stop_after:
                await asyncio.sleep(0.01)
            stop.set()
        await asyncio.wait_for(asyncio.gather(inf.run(stop), stopper()), 20)
        return inf
    inf = asyncio.run(main())
    return inf, replaced, events, errors


def test_list_then_watch_from_the_list_version_and_follow_bookmarks():
    c = ScriptedClient([listed([svc("a", "5")], "10")],
                       [[{"type": "ADDED", "object": svc("b", "11")}, {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "15"}}}],
                        [{"type": "DELETED", "object": svc("a", "16")}]])
    inf, replaced, events, _ = run(c, stop_after=4)
    assert c.calls[:3] == ["list", "watch@10", "watch@15"]  # no relist between watches
    assert [len(r) for r in replaced] == [1] and events == [("ADDED", "b"), ("DELETED", "a")]
    assert inf.listed.is_set()


def test_410_gone_relists_without_dropping_anything():
    c = ScriptedClient([listed([svc("a", "5")], "10"), listed([svc("a", "5"), svc("c", "30")], "30"),
                        listed([svc("c", "30")], "40")],
                       [[{"type": "ERROR", "object": {"code": 410, "message": "too old resource version"}}],
                        ApiError(410, "Gone")])
    inf, replaced, _, errors = run(c, stop_after=5)
    assert c.calls[:4] == ["list", "watch@10", "list", "watch@30"]
    assert [e.status for e in errors][:2] == [410, 410]
    assert len(replaced) >= 2 and len(replaced[1]) == 2  # the relist replaces state (diffed by the tracker)


def test_server_errors_back_off_and_keep_the_resource_version():
    c = ScriptedClient([listed([svc("a", "5")], "10")],
                       [ApiError(503, "unavailable"), ApiError(0, "connection refused"),
                        [{"type": "ADDED", "object": svc("b", "12")}]])
    inf, replaced, events, errors = run(c, stop_after=4)
    assert c.calls[:4] == ["list", "watch@10", "watch@10", "watch@10"]  # no relist on 5xx
    assert ("ADDED", "b") in events and len(replaced) == 1
