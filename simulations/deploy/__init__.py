"""The deployment harness: ``fedtune certs`` and ``fedtune deploy-local``.

- :mod:`.certs`: the CA, the SuperLink's TLS certificate and the SuperNodes' key pairs;
- :mod:`.processes`: process groups stopped with their whole trees, free ports;
- :mod:`.flower`: the app copy ``flwr run`` submits, the CLI connection, node configs;
- :mod:`.inputs`: the sites' files checked, the coordinator's run config;
- :mod:`.superlink`: a SuperLink and SuperNodes on the loopback interface;
- :mod:`.local`: ``deploy-local`` itself.
"""
