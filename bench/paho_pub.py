"""Reference: the least a Python program must do to publish one QoS 1 message with paho and exit."""

import sys

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

host, port, payload = sys.argv[1], int(sys.argv[2]), sys.argv[3]
client = mqtt.Client(CallbackAPIVersion.VERSION2)
client.connect(host, port)
info = client.publish("bench/x", payload, qos=1)
while not info.is_published():
    client.loop(0.1)
client.disconnect()
