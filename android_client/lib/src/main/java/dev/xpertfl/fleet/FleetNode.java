package dev.xpertfl.fleet;

import dev.xpertfl.fleet.ObjectTree.ObjectTreeException;
import dev.xpertfl.fleet.Records.RecordDict;
import dev.xpertfl.proto.ErrorProto;
import dev.xpertfl.proto.FleetProto;
import dev.xpertfl.proto.MessageProto;
import dev.xpertfl.proto.RecorddictProto;
import java.io.IOException;
import java.util.HashMap;
import java.util.HashSet;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.concurrent.Executors;
import java.util.concurrent.ScheduledExecutorService;
import java.util.concurrent.TimeUnit;
import java.util.function.BooleanSupplier;
import java.util.logging.Level;
import java.util.logging.Logger;

/**
 * A Flower SuperNode on the JVM: connects to a SuperLink, keeps its heartbeat, pulls messages,
 * reassembles and verifies their object trees, hands their content to a {@link Handler}, and
 * pushes the reply (or an error reply) as an object tree. One message at a time, as Flower's own
 * SuperNode does; a failure while handling one message becomes an error reply to that message and
 * the node goes on with the next.
 *
 * <p>What it does not do (not needed by a device that speaks a known app's contract): fetch the
 * run's FAB or run config, run a Python ClientApp, or isolate handlers in processes.
 */
public final class FleetNode implements AutoCloseable {
    private static final Logger LOG = Logger.getLogger("xpert.fleet");

    /** Flower's error codes (flwr.common.constant.ErrorCode). */
    public static final long ERROR_CLIENT_APP_RAISED_EXCEPTION = 2;
    public static final long ERROR_MESSAGE_UNAVAILABLE = 3;

    /** A received message, verified. */
    public static final class Received {
        public final MessageProto.Metadata metadata;
        public final RecordDict content;
        /** Bytes of all distinct objects of the message (what crossed the network as content). */
        public final long objectBytes;

        Received(MessageProto.Metadata metadata, RecordDict content, long objectBytes) {
            this.metadata = metadata;
            this.content = content;
            this.objectBytes = objectBytes;
        }

        public String messageType() {
            return metadata.getMessageType();
        }
    }

    /** What the device does with a message: its reply content, or an exception (sent as an error reply). */
    public interface Handler {
        RecordDict handle(Received message) throws Exception;
    }

    /** One handled message, for logs and tests. */
    public static final class Outcome {
        public final String messageType;
        public final String error; // null: replied with content
        public final long bytesDown;
        public final long bytesUp;
        public final double seconds;

        Outcome(String messageType, String error, long bytesDown, long bytesUp, double seconds) {
            this.messageType = messageType;
            this.error = error;
            this.bytesDown = bytesDown;
            this.bytesUp = bytesUp;
            this.seconds = seconds;
        }

        @Override
        public String toString() {
            return messageType + (error == null ? " ok" : " error: " + error) + String.format(
                    " (down %d B, up %d B, %.2fs)", bytesDown, bytesUp, seconds);
        }
    }

    private final FleetClient client;
    private final double heartbeatInterval;
    private long nodeId;
    private boolean selfRegistered;
    private ScheduledExecutorService heartbeats;
    private int pullTries = 60;
    private long pullBackoffMs = 250;
    private long maxMessageBytes = 1L << 30;
    private int concurrency = 4;

    public FleetNode(FleetClient client, double heartbeatIntervalSeconds) {
        this.client = client;
        this.heartbeatInterval = heartbeatIntervalSeconds;
    }

    public long nodeId() {
        return nodeId;
    }

    public FleetClient client() {
        return client;
    }

    /** Refuse messages whose objects add up to more than this (memory guard on a phone). */
    public FleetNode maxMessageBytes(long bytes) {
        this.maxMessageBytes = bytes;
        return this;
    }

    /** Object pulls/pushes in flight at once (Flower's SuperNode also transfers objects concurrently). */
    public FleetNode concurrency(int n) {
        this.concurrency = Math.max(1, n);
        return this;
    }

    /** Register (self-registration; skipped when the SuperLink manages nodes), activate, start heartbeats. */
    public long connect() throws IOException {
        try {
            client.registerNode();
            selfRegistered = true;
        } catch (FleetClient.FleetHttpException e) {
            // With --enable-supernode-auth the SuperLink refuses self-registration: the key must have
            // been registered by an operator (`flwr supernode register`); activation then works.
            LOG.info("self-registration refused (" + e.getMessage() + "); activating a pre-registered key");
        }
        nodeId = client.activateNode(heartbeatInterval);
        heartbeats = Executors.newSingleThreadScheduledExecutor(r -> {
            Thread t = new Thread(r, "flwr-heartbeat");
            t.setDaemon(true);
            return t;
        });
        long periodMs = (long) (heartbeatInterval * 1000 * 0.8); // Flower sends at 0.8 x the interval
        heartbeats.scheduleAtFixedRate(this::beat, periodMs, periodMs, TimeUnit.MILLISECONDS);
        LOG.info("connected to " + client.baseUrl() + " as node " + Long.toUnsignedString(nodeId));
        return nodeId;
    }

    private void beat() {
        try {
            if (!client.heartbeat(nodeId, heartbeatInterval)) LOG.warning("heartbeat not acknowledged: the SuperLink does not know node " + nodeId);
        } catch (IOException e) {
            LOG.warning("heartbeat failed: " + e.getMessage());
        }
    }

    /**
     * Pull and handle at most one message. Returns null when there was none; otherwise what happened.
     * Network failures (IOException) propagate: the caller decides to retry or stop.
     */
    public Outcome pollOnce(Handler handler) throws IOException {
        FleetProto.PullMessagesResponse res = client.pullMessages(nodeId);
        if (res.getMessagesListCount() == 0) return null;
        MessageProto.Message announced = res.getMessagesList(0);
        MessageProto.ObjectTree tree = res.getMessageObjectTrees(0);
        MessageProto.Metadata ins = announced.getMetadata();
        long t0 = System.nanoTime();
        String type = ins.getMessageType();
        LOG.info("received " + type + " message " + ins.getMessageId() + " (run " + Long.toUnsignedString(ins.getRunId()) + ", group " + ins.getGroupId() + ")");

        Received received;
        long down = 0;
        try {
            Map<String, byte[]> contents = pullObjects(ins.getRunId(), tree);
            for (byte[] b : contents.values()) down += b.length;
            ObjectTree.Decoded decoded = ObjectTree.decode(tree, contents, ins.getMessageId());
            if (decoded.content == null) throw new ObjectTreeException("instruction message carries an error, not content");
            MessageProto.Metadata own = decoded.metadata.toBuilder().setMessageId(ins.getMessageId()).build();
            if (!own.equals(ins)) LOG.warning("announced metadata differs from the message object; using the object's (hash-verified) metadata");
            received = new Received(own, decoded.content, down);
        } catch (ObjectTreeException | IOException e) {
            String why = "message " + ins.getMessageId() + " could not be received: " + e.getMessage();
            LOG.severe(why);
            // The message is consumed either way; an error reply lets the server go on at once.
            tryConfirm(ins);
            long up = reply(ins, null, error(ERROR_MESSAGE_UNAVAILABLE, why), seconds(t0));
            return new Outcome(type, why, down, up, seconds(t0));
        }
        client.confirmMessageReceived(nodeId, ins.getRunId(), ins.getMessageId());

        RecordDict content = null;
        String failure = null;
        try {
            content = handler.handle(received);
            if (content == null) throw new IllegalStateException("handler returned no reply");
        } catch (Exception e) {
            failure = e.getClass().getSimpleName() + ": " + e.getMessage();
            LOG.log(Level.WARNING, "handling " + type + " failed: " + failure);
        }
        ErrorProto.Error err = failure == null ? null : error(ERROR_CLIENT_APP_RAISED_EXCEPTION,
                "Error in the XPerT JVM device while handling '" + type + "': " + failure);
        long up = reply(ins, content, err, seconds(t0));
        return new Outcome(type, failure, down, up, seconds(t0));
    }

    private void tryConfirm(MessageProto.Metadata ins) {
        try {
            client.confirmMessageReceived(nodeId, ins.getRunId(), ins.getMessageId());
        } catch (IOException e) {
            LOG.warning("could not confirm " + ins.getMessageId() + ": " + e.getMessage());
        }
    }

    private static double seconds(long t0) {
        return (System.nanoTime() - t0) / 1e9;
    }

    private static ErrorProto.Error error(long code, String reason) {
        return ErrorProto.Error.newBuilder().setCode(code).setReason(reason).build();
    }

    /** Pulls every object of the tree (retrying objects not yet available), {@link #concurrency} at a time. */
    Map<String, byte[]> pullObjects(long runId, MessageProto.ObjectTree tree) throws IOException {
        List<String> ids = ObjectTree.postOrderIds(tree);
        for (String id : ids) {
            if (!id.matches("[0-9a-f]{64}")) throw new ObjectTreeException("object tree holds an invalid object id '" + id + "'");
        }
        Map<String, byte[]> out = new java.util.concurrent.ConcurrentHashMap<>();
        java.util.concurrent.atomic.AtomicLong total = new java.util.concurrent.atomic.AtomicLong();
        forEach(ids, id -> {
            byte[] content = null;
            for (int attempt = 0; attempt < pullTries && content == null; attempt++) {
                MessageProto.PullObjectResponse r = client.pullObject(nodeId, runId, id);
                if (!r.getObjectFound()) throw new ObjectTreeException("object " + id + " is unknown to the SuperLink");
                if (r.getObjectAvailable()) {
                    content = r.getObjectContent().toByteArray();
                } else {
                    sleep(Math.min(pullBackoffMs << Math.min(attempt, 4), 4000));
                }
            }
            if (content == null) throw new ObjectTreeException("object " + id + " did not become available");
            if (total.addAndGet(content.length) > maxMessageBytes) {
                throw new ObjectTreeException("message exceeds the device limit of " + maxMessageBytes + " bytes");
            }
            out.put(id, content);
        });
        return out;
    }

    /** One Fleet call per item. */
    interface Call {
        void run(String id) throws IOException;
    }

    /** Runs {@code call} for every id on {@link #concurrency} threads; the first failure is rethrown. */
    private void forEach(List<String> ids, Call call) throws IOException {
        if (concurrency <= 1 || ids.size() <= 1) {
            for (String id : ids) call.run(id);
            return;
        }
        java.util.concurrent.ExecutorService pool = Executors.newFixedThreadPool(Math.min(concurrency, ids.size()));
        try {
            List<java.util.concurrent.Future<?>> futures = new java.util.ArrayList<>();
            for (String id : ids) futures.add(pool.submit(() -> {
                call.run(id);
                return null;
            }));
            for (java.util.concurrent.Future<?> f : futures) {
                try {
                    f.get();
                } catch (java.util.concurrent.ExecutionException e) {
                    Throwable c = e.getCause();
                    if (c instanceof IOException) throw (IOException) c;
                    if (c instanceof RuntimeException) throw (RuntimeException) c;
                    throw new IOException(c);
                } catch (InterruptedException e) {
                    Thread.currentThread().interrupt();
                    throw new IOException("interrupted", e);
                }
            }
        } finally {
            pool.shutdownNow();
        }
    }

    /** Builds and pushes the reply to {@code ins}; returns the bytes of objects pushed. */
    long reply(MessageProto.Metadata ins, RecordDict content, ErrorProto.Error err, double runtime) throws IOException {
        double now = System.currentTimeMillis() / 1000.0;
        MessageProto.Metadata.Builder md = MessageProto.Metadata.newBuilder()
                .setRunId(ins.getRunId())
                .setSrcNodeId(ins.getDstNodeId())
                .setDstNodeId(ins.getSrcNodeId())
                .setReplyToMessageId(ins.getMessageId())
                .setGroupId(ins.getGroupId())
                .setCreatedAt(now)
                .setTtl(ins.getCreatedAt() + ins.getTtl() - now) // Flower: a reply lives no longer than its instruction
                .setMessageType(ins.getMessageType());
        if (ins.hasDstTaskId()) md.setSrcTaskId(ins.getDstTaskId());
        if (ins.hasSrcTaskId()) md.setDstTaskId(ins.getSrcTaskId());
        ObjectTree.Encoded enc = ObjectTree.encodeMessage(md.build(), content, err);
        MessageProto.Message.Builder announced = MessageProto.Message.newBuilder().setMetadata(md.setMessageId(enc.rootId));
        if (err != null) {
            announced.setError(err);
        } else {
            announced.setContent(RecorddictProto.RecordDict.getDefaultInstance()); // content travels as objects
        }
        FleetProto.PushMessagesResponse res = client.pushMessages(nodeId, announced.build(), enc.tree, runtime);
        Set<String> wanted = new HashSet<>(res.getObjectsToPushList());
        List<String> push = new java.util.ArrayList<>();
        long up = 0;
        for (Map.Entry<String, byte[]> e : enc.objects.entrySet()) { // children before parents
            if (wanted.contains(e.getKey())) {
                push.add(e.getKey());
                up += e.getValue().length;
            }
        }
        forEach(push, id -> {
            if (!client.pushObject(nodeId, ins.getRunId(), res.getSessionId(), id, enc.objects.get(id))) {
                throw new IOException("SuperLink did not store object " + id + " of reply " + enc.rootId);
            }
        });
        LOG.info("replied to " + ins.getMessageType() + " " + ins.getMessageId() + (err != null ? " with an error" : "")
                + ": " + wanted.size() + " object(s), " + up + " bytes");
        return up;
    }

    /** Poll until {@code stop} is true; network errors are logged and retried with a pause. */
    public void run(Handler handler, BooleanSupplier stop, long pollIntervalMs) {
        while (!stop.getAsBoolean()) {
            try {
                if (pollOnce(handler) == null) sleep(pollIntervalMs);
            } catch (IOException e) {
                LOG.warning("fleet call failed: " + e.getMessage() + "; retrying");
                sleep(Math.max(pollIntervalMs, 1000));
            }
        }
    }

    private static void sleep(long ms) {
        try {
            Thread.sleep(ms);
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
            throw new IllegalStateException("interrupted", e);
        }
    }

    /** Stop heartbeats, deactivate, and unregister if this node registered itself. */
    @Override
    public void close() {
        if (heartbeats != null) heartbeats.shutdownNow();
        if (nodeId == 0) return;
        try {
            client.deactivateNode(nodeId);
            if (selfRegistered) client.unregisterNode(nodeId);
        } catch (IOException e) {
            LOG.warning("could not leave cleanly: " + e.getMessage());
        }
        nodeId = 0;
    }
}
