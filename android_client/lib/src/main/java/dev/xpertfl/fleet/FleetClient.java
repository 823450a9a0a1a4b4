package dev.xpertfl.fleet;

import com.google.protobuf.ByteString;
import com.google.protobuf.InvalidProtocolBufferException;
import com.google.protobuf.MessageLite;
import com.google.protobuf.Parser;
import dev.xpertfl.proto.FleetProto;
import dev.xpertfl.proto.HeartbeatProto;
import dev.xpertfl.proto.MessageProto;
import dev.xpertfl.proto.NodeProto;
import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.io.InputStream;
import java.io.OutputStream;
import java.net.HttpURLConnection;
import java.net.URL;
import java.nio.charset.StandardCharsets;
import java.security.KeyPair;
import java.security.KeyPairGenerator;
import java.security.Signature;
import java.security.spec.ECGenParameterSpec;
import java.time.OffsetDateTime;
import java.time.ZoneOffset;
import java.time.format.DateTimeFormatter;
import java.util.Base64;

/**
 * The Fleet API of a flwr 1.41 SuperLink, as a SuperNode calls it: protobuf over HTTP POST on the
 * SuperLink's single port ({@code /v1/fleet/<rpc>}, content type {@code application/protobuf}).
 *
 * <p>Every request carries the SuperNode authentication headers the SuperLink's
 * {@code NodeAuthMiddleware} checks on every Fleet route (not only with {@code --enable-supernode-auth}):
 * {@code flwr-public-key} (base64 of the node's PEM public key, EC secp384r1),
 * {@code flwr-timestamp} (ISO-8601 UTC, must be within 5 min) and {@code flwr-signature} (base64
 * ECDSA-SHA256 over the timestamp). The SuperLink checks that the key matches the node id of the
 * request. Runtime-version headers identify this client as a SuperNode of the pinned flwr version.
 *
 * <p>Only {@link HttpURLConnection} and {@code java.security}: the same code runs on Android.
 */
public final class FleetClient {
    public static final String FLWR_VERSION = "1.41.0";
    private static final DateTimeFormatter ISO_MICROS = DateTimeFormatter.ofPattern("yyyy-MM-dd'T'HH:mm:ss.SSSSSSxxx");

    /** An HTTP status other than 200, with the SuperLink's error text. */
    public static final class FleetHttpException extends IOException {
        public final int status;

        public FleetHttpException(String path, int status, String body) {
            super("SuperLink answered " + status + " to " + path + (body.isEmpty() ? "" : ": " + body));
            this.status = status;
        }
    }

    private final String baseUrl;
    private final KeyPair keys;
    private final byte[] publicKeyPem;
    private final int timeoutMs;
    private final String componentName;
    /** Bytes sent and received in request/response bodies (for accounting). */
    private long bytesSent;
    private long bytesReceived;

    /**
     * @param superlink "host:port" of the SuperLink (its one HTTP port) or a full http(s) URL
     * @param keys an EC key pair (secp384r1 like Flower's); null: a fresh one
     */
    public FleetClient(String superlink, KeyPair keys, int timeoutMs, String componentName) {
        this.baseUrl = (superlink.startsWith("http://") || superlink.startsWith("https://") ? superlink : "http://" + superlink)
                .replaceAll("/+$", "");
        this.keys = keys != null ? keys : newKeyPair();
        this.publicKeyPem = pem(this.keys);
        this.timeoutMs = timeoutMs;
        this.componentName = componentName;
    }

    public static KeyPair newKeyPair() {
        try {
            KeyPairGenerator g = KeyPairGenerator.getInstance("EC");
            g.initialize(new ECGenParameterSpec("secp384r1"));
            return g.generateKeyPair();
        } catch (java.security.GeneralSecurityException e) {
            throw new IllegalStateException("no EC secp384r1 support", e);
        }
    }

    /** The public key as Python's cryptography writes it (SubjectPublicKeyInfo PEM, 64-char lines). */
    static byte[] pem(KeyPair keys) {
        String b64 = Base64.getEncoder().encodeToString(keys.getPublic().getEncoded());
        StringBuilder s = new StringBuilder("-----BEGIN PUBLIC KEY-----\n");
        for (int i = 0; i < b64.length(); i += 64) s.append(b64, i, Math.min(b64.length(), i + 64)).append('\n');
        s.append("-----END PUBLIC KEY-----\n");
        return s.toString().getBytes(StandardCharsets.US_ASCII);
    }

    public byte[] publicKeyPem() {
        return publicKeyPem.clone();
    }

    public String baseUrl() {
        return baseUrl;
    }

    public synchronized long bytesSent() {
        return bytesSent;
    }

    public synchronized long bytesReceived() {
        return bytesReceived;
    }

    // --- transport -------------------------------------------------------------------------------
    private <T extends MessageLite> T call(String rpc, MessageLite request, Parser<T> parser, int timeout) throws IOException {
        String path = "/v1/fleet/" + rpc;
        byte[] body = ObjectTree.deterministic(request);
        HttpURLConnection c = (HttpURLConnection) new URL(baseUrl + path).openConnection();
        try {
            c.setRequestMethod("POST");
            c.setDoOutput(true);
            c.setConnectTimeout(timeout);
            c.setReadTimeout(timeout);
            c.setFixedLengthStreamingMode(body.length);
            c.setRequestProperty("content-type", "application/protobuf");
            c.setRequestProperty("accept", "application/protobuf");
            c.setRequestProperty("flwr-package-name", "flwr");
            c.setRequestProperty("flwr-package-version", FLWR_VERSION);
            c.setRequestProperty("flwr-component-name", componentName);
            String ts = OffsetDateTime.now(ZoneOffset.UTC).format(ISO_MICROS);
            c.setRequestProperty("flwr-public-key", Base64.getEncoder().encodeToString(publicKeyPem));
            c.setRequestProperty("flwr-timestamp", ts);
            c.setRequestProperty("flwr-signature", Base64.getEncoder().encodeToString(sign(ts)));
            try (OutputStream out = c.getOutputStream()) {
                out.write(body);
            }
            int status = c.getResponseCode();
            if (status != 200) {
                InputStream err = c.getErrorStream();
                String text = err == null ? "" : new String(readAll(err, 64 * 1024), StandardCharsets.UTF_8);
                throw new FleetHttpException(path, status, text);
            }
            byte[] response;
            try (InputStream in = c.getInputStream()) {
                response = readAll(in, Integer.MAX_VALUE);
            }
            synchronized (this) {
                bytesSent += body.length;
                bytesReceived += response.length;
            }
            try {
                return parser.parseFrom(response);
            } catch (InvalidProtocolBufferException e) {
                throw new IOException("unreadable protobuf response from " + path, e);
            }
        } catch (IOException e) {
            c.disconnect(); // a broken connection must not go back to the keep-alive pool
            throw e;
        }
        // no disconnect(): with the body read to its end, the connection is kept alive and reused
    }

    private <T extends MessageLite> T call(String rpc, MessageLite request, Parser<T> parser) throws IOException {
        return call(rpc, request, parser, timeoutMs);
    }

    private byte[] sign(String timestamp) {
        try {
            Signature s = Signature.getInstance("SHA256withECDSA");
            s.initSign(keys.getPrivate());
            s.update(timestamp.getBytes(StandardCharsets.US_ASCII));
            return s.sign(); // DER, as Python's cryptography produces and verifies
        } catch (java.security.GeneralSecurityException e) {
            throw new IllegalStateException(e);
        }
    }

    private static byte[] readAll(InputStream in, int limit) throws IOException {
        ByteArrayOutputStream out = new ByteArrayOutputStream();
        byte[] buf = new byte[64 * 1024];
        int n;
        while ((n = in.read(buf)) > 0 && out.size() < limit) out.write(buf, 0, n);
        return out.toByteArray();
    }

    private static NodeProto.Node node(long nodeId) {
        return NodeProto.Node.newBuilder().setNodeId(nodeId).build();
    }

    // --- RPCs ------------------------------------------------------------------------------------
    /** Self-registration (the SuperLink refuses it when it runs with --enable-supernode-auth). */
    public long registerNode() throws IOException {
        return call("register-node", FleetProto.RegisterNodeFleetRequest.newBuilder()
                .setPublicKey(ByteString.copyFrom(publicKeyPem)).build(), FleetProto.RegisterNodeFleetResponse.parser()).getNodeId();
    }

    public long activateNode(double heartbeatInterval) throws IOException {
        return call("activate-node", FleetProto.ActivateNodeRequest.newBuilder()
                .setPublicKey(ByteString.copyFrom(publicKeyPem)).setHeartbeatInterval(heartbeatInterval).build(),
                FleetProto.ActivateNodeResponse.parser()).getNodeId();
    }

    public void deactivateNode(long nodeId) throws IOException {
        call("deactivate-node", FleetProto.DeactivateNodeRequest.newBuilder().setNodeId(nodeId).build(),
                FleetProto.DeactivateNodeResponse.parser());
    }

    public void unregisterNode(long nodeId) throws IOException {
        call("unregister-node", FleetProto.UnregisterNodeFleetRequest.newBuilder().setNodeId(nodeId).build(),
                FleetProto.UnregisterNodeFleetResponse.parser());
    }

    public boolean heartbeat(long nodeId, double interval) throws IOException {
        return call("send-node-heartbeat", HeartbeatProto.SendNodeHeartbeatRequest.newBuilder()
                .setNode(node(nodeId)).setHeartbeatInterval(interval).build(),
                HeartbeatProto.SendNodeHeartbeatResponse.parser(), Math.min(timeoutMs, 5000)).getSuccess();
    }

    public FleetProto.PullMessagesResponse pullMessages(long nodeId) throws IOException {
        return call("pull-messages", FleetProto.PullMessagesRequest.newBuilder().setNode(node(nodeId)).build(),
                FleetProto.PullMessagesResponse.parser());
    }

    public MessageProto.PullObjectResponse pullObject(long nodeId, long runId, String objectId) throws IOException {
        return call("pull-object", MessageProto.PullObjectRequest.newBuilder().setNode(node(nodeId)).setRunId(runId)
                .setObjectId(objectId).build(), MessageProto.PullObjectResponse.parser());
    }

    public void confirmMessageReceived(long nodeId, long runId, String messageId) throws IOException {
        call("confirm-message-received", MessageProto.ConfirmMessageReceivedRequest.newBuilder().setNode(node(nodeId))
                .setRunId(runId).setMessageObjectId(messageId).build(), MessageProto.ConfirmMessageReceivedResponse.parser());
    }

    public FleetProto.PushMessagesResponse pushMessages(long nodeId, MessageProto.Message message,
                                                        MessageProto.ObjectTree tree, double clientAppRuntime) throws IOException {
        return call("push-messages", FleetProto.PushMessagesRequest.newBuilder().setNode(node(nodeId)).addMessagesList(message)
                .addMessageObjectTrees(tree).addClientappRuntimeList(clientAppRuntime).build(), FleetProto.PushMessagesResponse.parser());
    }

    public boolean pushObject(long nodeId, long runId, String sessionId, String objectId, byte[] content) throws IOException {
        return call("push-object", MessageProto.PushObjectRequest.newBuilder().setNode(node(nodeId)).setRunId(runId)
                .setSessionId(sessionId).setObjectId(objectId).setObjectContent(ByteString.copyFrom(content)).build(),
                MessageProto.PushObjectResponse.parser()).getStored();
    }
}
