#!/bin/sh
# Idle probe (scenarios agentd-python, agentd-explore): the guest only serves guest-init's
# agent; nothing ticks, so measurements see no background work.
echo "probe: idle"
exec sleep 2147483647
